"""Transports (decode a CheckRequest, call the engine, encode the answer) and the admin HTTP port."""
