"""Kept for tests written before edgeforge/testing.py (branches merged later still import it)."""

from edgeforge.testing import EVAL_TEXT, EXTRA_SHAPES, SHAPES, make_tiny_llama  # noqa: F401
