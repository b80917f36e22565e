"""Helpers for testing backends of the ``fused_step`` contract (like torch.testing: no pytest needed)."""
