"""Tests of the projections layer."""
