"""Argument checks shared by every public entry point.

Shape, dtype and device checks are static and run on every call. Checks that need the
values (NaN/Inf, label ranges) synchronise with the device, so the backends run them
inside their opaque ops, where ``torch.compile`` does not trace them.
"""

from __future__ import annotations

import math
import numbers

import torch

DENOMINATORS = ("all", "each_positive", "negatives")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "torch", "triton")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive real number; got {type(temperature).__name__}")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive and finite; got {temperature}")
    return temperature


def check_embeddings(name: str, x) -> tuple[int, int]:
    """Accepts (N, D) rows or a (B, C, H, W) feature map (B*H*W rows of size C); returns (N, D)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, float64, bfloat16, float16); got {x.dtype}")
    if x.dim() == 4:
        n, d = x.shape[0] * x.shape[2] * x.shape[3], x.shape[1]
    elif x.dim() == 2:
        n, d = x.shape
    else:
        raise ValueError(f"{name} must be (N, D) embeddings or a (B, C, H, W) feature map; got shape {tuple(x.shape)}")
    if n == 0:
        raise ValueError(f"{name} must hold at least one embedding; got shape {tuple(x.shape)}")
    if d == 0:
        raise ValueError(f"{name} must have an embedding size D >= 1; got shape {tuple(x.shape)}")
    return n, d


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), row b*H*W + h*W + w being pixel (b, h, w); rows pass through."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x


def check_pair(query: torch.Tensor, key: torch.Tensor, query_dim: int, key_dim: int) -> None:
    if key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}; put both on one device")
    if key.dtype != query.dtype:
        raise TypeError(f"key has dtype {key.dtype} but query has {query.dtype}; use one dtype for both")
    if key_dim != query_dim:
        raise ValueError(f"key has embedding size {key_dim} but query has {query_dim}; they must match")


def check_index_vector(name: str, x, length: int, device: torch.device, what: str) -> torch.Tensor | None:
    """Labels or groups: an integer tensor with one entry per embedding (any shape of that size)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor; got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must have an integer dtype; got {x.dtype}")
    if x.numel() != length:
        raise ValueError(f"{name} must hold one entry per {what} ({length}); got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the embeddings are on {device}")
    return x.reshape(length).long()


def check_weights(weights, length: int, device: torch.device) -> torch.Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a floating torch.Tensor; got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must have a floating dtype; got {weights.dtype}")
    if weights.numel() != length:
        raise ValueError(f"weights must hold one entry per query ({length}); got shape {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but the embeddings are on {device}")
    return weights.reshape(length)


def check_values(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    key_labels: torch.Tensor,
    ignore_index: int,
) -> None:
    """Value checks: NaN/Inf embeddings, negative labels other than ignore_index.

    On a GPU every test of a device value waits for the device, so all are combined into one
    synchronisation; the message naming the culprit is worked out only when one fails.
    """
    def bad_ids(x):
        return (x < 0) & (x != ignore_index)

    embeddings = [("query", query)] + ([] if key is query else [("key", key)])
    ids = [("labels", labels)] + ([] if key_labels is labels else [("key_labels", key_labels)])
    flags = [~torch.isfinite(x).all() for _, x in embeddings] + [bad_ids(x).any() for _, x in ids]
    if not bool(torch.stack(flags).any()):
        return
    for name, x in embeddings:
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or Inf")
    for name, x in ids:
        bad = bad_ids(x)
        if bad.any():
            raise ValueError(
                f"{name} must be non-negative class ids or ignore_index={ignore_index}; "
                f"found {int(x[bad][0])}"
            )


def check_weight_values(weights: torch.Tensor) -> None:
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")
