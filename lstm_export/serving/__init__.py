"""Serving with a runtime: stateful streaming sessions, the HTTP server, the load test."""
