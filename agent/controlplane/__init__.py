"""Control plane: signed policy bundles and revocations streamed to agents (server and agent sides)."""
