"""Measuring retrieval quality the way the field reports it."""
