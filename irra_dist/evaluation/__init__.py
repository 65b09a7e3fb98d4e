"""Retrieval evaluation: exact chunked metrics."""
