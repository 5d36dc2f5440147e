"""Shared helpers for tests: signing keys and tokens, and in-process test services."""
