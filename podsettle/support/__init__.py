"""Utilities every layer may use (structured logging, the bounded-cache step).

The bottom of the layers: nothing here imports anything else of podsettle's.
"""
