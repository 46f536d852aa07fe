"""Tests of the tree itself: the layers, the environment rule, packaging, logging."""
