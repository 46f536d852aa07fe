"""Tests of the sandbox layer."""
