"""Stub: filled by issue #4 (attention-level low rank)."""
