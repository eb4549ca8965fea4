"""`authz-agent bench`: the latency and throughput of a user's own policy under their own traffic mix."""
