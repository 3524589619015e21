"""Triton kernels of contrastkit, installed as ``contrastkit.kernels``.

The fused masked InfoNCE and patch pooling kernels are added here; until then
``available()`` reports why the Triton backend cannot run.
"""

from __future__ import annotations


def unavailable_reason() -> str | None:
    """None when the Triton backend can run, else a sentence saying why not."""
    return "the fused Triton kernels are not part of this build yet; use backend='torch'"


def available() -> bool:
    return unavailable_reason() is None
