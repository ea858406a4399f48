"""Thin entry points, one per job a user submits (``python -m jobs.NAME``)."""
