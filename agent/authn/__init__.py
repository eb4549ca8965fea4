"""Verifiers, one per credential kind; each turns a credential into a Principal or an AuthnError."""
