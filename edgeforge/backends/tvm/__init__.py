"""TVM backend: QDIR -> compiled TVM module for a target (see compile.py)."""

from .compile import compile_model

__all__ = ["compile_model"]
