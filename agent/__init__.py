"""authz-agent: an Envoy ext_authz sidecar that authenticates, authorizes and audits every request."""

__version__ = "0.1.0"
