"""The backends of every fused operation (``info_nce``, ``pool_patches``) and the one place that
picks among them.

============  =================================================================  ==============
backend       what it is                                                         ``auto`` picks it
============  =================================================================  ==============
reference     dense, autograd; the specification (``_reference.py``)              never
dense         dense and lean: (B, Gq, Gk) logits by batched products when the     up to
              groups are B equal blocks, one (N, M) block otherwise               ``DENSE_MAX_LOGITS``
                                                                                  (blocks: ``DENSE_MAX_BLOCK_LOGITS``)
torch         chunked: query blocks against all keys, closed-form backward        larger, off CUDA
triton        the fused kernels (``kernels/``, through ``_triton.py``)            larger, on CUDA
============  =================================================================  ==============

Every backend takes the same two objects: the tensors (``OpInputs``) and the static settings
(``InfoNCEOptions``); ``pool_patches`` is a torch mean on every backend but triton.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from einops import reduce

from . import _triton
from ._chunked import chunked_rows
from ._dense import dense_block_rows
from ._masks import normalized
from ._options import InfoNCEOptions, OpInputs
from ._reference import dense_rows
from ._validation import BACKENDS, check_choice

# The most logits for which ``auto`` takes the dense path, by device type. Above it the chunked
# path (CPU) or the kernels (CUDA) win: their per-call cost is fixed, the dense path's grows with
# every logit it materialises (and its memory with it).
# CPU: measured with benchmarks/crossover.py, one thread (results/crossover-amd-epyc-2026-12-06.md):
# self-contrast SupCon crosses near 2^21.2 logits, the prototype shape near 2^22.4, block calls stay
# faster beyond 2^27; the smallest, 2^21, is the limit.
# CUDA: an estimate until a GPU session's crossover run sets it: the kernels' call path costs about
# 27 launches (19 device ops and 8 Triton kernels, ~0.15 ms of host time) beside its tile loops, the
# dense path about 80 ps a logit (~30 ops over fp32 logits at ~3 TB/s), so they cross near 2^21.
DENSE_MAX_LOGITS = {"cpu": 1 << 21, "cuda": 1 << 21}
# The same for calls whose groups are B equal blocks (per-image negatives, prototype mode): B small
# products stay ahead of the chunked path far longer. CPU, the same sweep: the prototype shape is at
# parity near 2^23 (0.82x at 2^22, 1.01x at 2^23, 0.83x at 2^24, with less memory than the chunked
# path there), paired blocks beyond 2^26.9; the smaller, 2^23, is the limit. CUDA: the estimate above
# until a GPU session measures it.
DENSE_MAX_BLOCK_LOGITS = {"cpu": 1 << 23, "cuda": 1 << 21}
_DEFAULT_DENSE_MAX_LOGITS = 1 << 22


class Backend(NamedTuple):
    """One implementation of every fused operation, and what it takes."""

    name: str
    supports: Callable[[str, torch.Tensor, int], bool]  # (operation, input, embedding size or channels)
    info_nce_rows: Callable[[OpInputs, InfoNCEOptions], tuple[torch.Tensor, torch.Tensor | None]]
    pool_patches: Callable[[torch.Tensor, int, int, bool], torch.Tensor]


def mean_pool(features: torch.Tensor, grid_h: int, grid_w: int, normalize: bool) -> torch.Tensor:
    pooled = reduce(features, "b c (gh ph) (gw pw) -> b c gh gw", "mean", gh=grid_h, gw=grid_w)
    return normalized(pooled, dim=1) if normalize else pooled


def _any_input(operation: str, x: torch.Tensor, size: int) -> bool:
    return True


BACKEND_TABLE = {
    "reference": Backend("reference", _any_input, dense_rows, mean_pool),
    "dense": Backend("dense", _any_input, dense_block_rows, mean_pool),
    "torch": Backend("torch", _any_input, chunked_rows, mean_pool),
    "triton": Backend("triton", _triton.supports, _triton.info_nce_rows, _triton.pool_patches),
}


def dense_max_logits(device: torch.device, blocked: bool = False) -> int:
    return (DENSE_MAX_BLOCK_LOGITS if blocked else DENSE_MAX_LOGITS).get(device.type, _DEFAULT_DENSE_MAX_LOGITS)


def resolve_backend(backend: str, x: torch.Tensor, size: int, operation: str, logits: int | None = None,
                    blocked: bool = False) -> Backend:
    """The backend that runs ``operation`` on ``x``: the named one, or for ``"auto"``

    * the dense path when the call forms at most ``DENSE_MAX_LOGITS[device]`` logits
      (``logits``: how many the dense path would form; ``None`` for operations without one), or
      ``DENSE_MAX_BLOCK_LOGITS[device]`` when it forms them in equal blocks (``blocked``);
    * else the Triton kernels when they take ``x`` (CUDA, a kernel dtype, a supported size);
    * else the chunked torch path.

    A backend named explicitly runs even where ``auto`` would not pick it, so its own errors
    (e.g. the kernels' refusal of float64) reach the caller.
    """
    check_choice("backend", backend, BACKENDS)
    if backend != "auto":
        return BACKEND_TABLE[backend]
    if logits is not None and logits <= dense_max_logits(x.device, blocked):
        return BACKEND_TABLE["dense"]
    triton = BACKEND_TABLE["triton"]
    return triton if triton.supports(operation, x, size) else BACKEND_TABLE["torch"]
