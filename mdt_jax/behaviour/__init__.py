"""Behaviour policies and dataset collection (the project's own offline data)."""
