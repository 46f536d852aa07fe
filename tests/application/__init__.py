"""Tests of the application layer: the engine, its request, writer, processor and settings."""
