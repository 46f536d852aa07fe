"""Audit: streaming replay of the event log through the aggregate's own code."""
