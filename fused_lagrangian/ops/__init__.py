"""Autograd-facing ops: one module per op, each with its reference implementation."""

from .lagrangian_term import lagrangian_term

__all__ = ["lagrangian_term"]
