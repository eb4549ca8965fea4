"""`authz-agent demo`: Envoy + agent + a local identity provider + a demo app, wired on loopback."""
