"""Route matching and rule evaluation: pure functions of the compiled policy, no I/O, no grpc."""
