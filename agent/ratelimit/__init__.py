"""Rate limits: token buckets per key on the hot path (native with a pure twin)."""
