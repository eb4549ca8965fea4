"""`authz-agent bench`: what authorization costs on a user's own policy and traffic mix (its `policy test` cases),
through the real transport and optionally a real Envoy; a terminal table, JSON, an HTML report and CI checks."""
