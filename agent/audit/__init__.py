"""Decision records and where they are written: one JSON line per decision, never a credential."""
