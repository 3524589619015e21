"""The one dispatch point: which backend ``auto`` picks, by device, dtype, size and structure."""

from __future__ import annotations

import pytest
import torch

import contrastkit._backends as backends
from contrastkit import info_nce
from contrastkit._backends import DENSE_MAX_BLOCK_LOGITS, DENSE_MAX_LOGITS, resolve_backend


class Cuda:
    """Stands in for a CUDA tensor: the dispatch reads only the device and the dtype."""

    device = torch.device("cuda")

    def __init__(self, dtype):
        self.dtype = dtype


def test_auto_takes_dense_up_to_the_crossover_on_each_side(monkeypatch):
    from contrastkit import kernels

    cpu = torch.zeros(1)
    limit = DENSE_MAX_LOGITS["cpu"]
    assert resolve_backend("auto", cpu, 128, "info_nce", limit).name == "dense"
    assert resolve_backend("auto", cpu, 128, "info_nce", limit + 1).name == "torch"
    blocks = DENSE_MAX_BLOCK_LOGITS["cpu"]
    assert blocks > limit  # measured: B small products stay ahead longer
    assert resolve_backend("auto", cpu, 128, "info_nce", blocks, blocked=True).name == "dense"
    assert resolve_backend("auto", cpu, 128, "info_nce", blocks + 1, blocked=True).name == "torch"
    assert resolve_backend("auto", cpu, 128, "pool_patches").name == "torch"
    monkeypatch.setattr(kernels, "available", lambda: True)
    limit = DENSE_MAX_LOGITS["cuda"]
    assert resolve_backend("auto", Cuda(torch.bfloat16), 128, "info_nce", limit).name == "dense"
    assert resolve_backend("auto", Cuda(torch.bfloat16), 128, "info_nce", limit + 1).name == "triton"
    # Past the crossover, what the kernels do not take goes to the chunked path.
    assert resolve_backend("auto", Cuda(torch.float64), 128, "info_nce", limit + 1).name == "torch"
    assert resolve_backend("auto", Cuda(torch.bfloat16), 4096, "info_nce", limit + 1).name == "torch"
    assert resolve_backend("auto", Cuda(torch.float32), 1024, "info_nce", limit + 1).name == "torch"


def test_auto_picks_by_device_dtype_and_size_without_a_logit_count(monkeypatch):
    from contrastkit import kernels

    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu, 128, "info_nce").name == "torch"
    assert resolve_backend("reference", cpu, 128, "info_nce").name == "reference"
    with pytest.raises(ValueError, match="backend"):
        resolve_backend("cuda", cpu, 128, "info_nce")
    monkeypatch.setattr(kernels, "available", lambda: True)
    assert resolve_backend("auto", Cuda(torch.bfloat16), 128, "info_nce").name == "triton"
    assert resolve_backend("auto", Cuda(torch.float64), 128, "info_nce").name == "torch"
    assert resolve_backend("auto", Cuda(torch.float16), 4096, "pool_patches").name == "triton"
    assert resolve_backend("auto", Cuda(torch.float64), 16, "pool_patches").name == "torch"
    monkeypatch.setattr(kernels, "available", lambda: False)
    assert resolve_backend("auto", Cuda(torch.bfloat16), 128, "info_nce").name == "torch"


def test_an_explicit_backend_is_always_taken():
    cpu = torch.zeros(1)
    for name in ("reference", "dense", "torch", "triton"):
        assert resolve_backend(name, cpu, 128, "info_nce", 1).name == name


def _chosen(monkeypatch):
    chosen = []
    original = backends.resolve_backend

    def spy(*args, **kwargs):
        backend = original(*args, **kwargs)
        chosen.append((backend.name, args[-1]))
        return backend

    monkeypatch.setattr("contrastkit.core.resolve_backend", spy)
    return chosen


def test_info_nce_counts_the_logits_of_the_block_structure(monkeypatch):
    chosen = _chosen(monkeypatch)
    x = torch.randn(64, 8)
    info_nce(x, labels=torch.randint(0, 3, (64,)))
    info_nce(x, x.flip(0), groups=8)  # 8 blocks of 8 queries against 8 keys
    info_nce(x, x.flip(0), groups=torch.arange(64) // 8)  # the same groups as ids: all 64 x 64 pairs
    assert chosen == [("dense", 64 * 64), ("dense", 8 * 8 * 8), ("dense", 64 * 64)]


def test_auto_leaves_the_dense_path_above_the_crossover(monkeypatch):
    # Block calls have a crossover of their own; the unblocked one does not move them.
    monkeypatch.setitem(DENSE_MAX_BLOCK_LOGITS, "cpu", 8 * 8 * 8)
    monkeypatch.setitem(DENSE_MAX_LOGITS, "cpu", 8 * 8 * 8 - 1)
    chosen = _chosen(monkeypatch)
    x = torch.randn(64, 8, dtype=torch.float64)
    blocked = info_nce(x, x.flip(0), groups=8)
    ids = info_nce(x, x.flip(0), groups=torch.arange(64) // 8)
    # Above the crossover the int groups reach the chunked path as ids, with the same value.
    monkeypatch.setitem(DENSE_MAX_BLOCK_LOGITS, "cpu", 8 * 8 * 8 - 1)
    monkeypatch.setitem(DENSE_MAX_LOGITS, "cpu", 8 * 8 * 8)
    chunked = info_nce(x, x.flip(0), groups=8)
    assert [name for name, _ in chosen] == ["dense", "torch", "torch"]
    torch.testing.assert_close(blocked, ids)
    torch.testing.assert_close(chunked, ids)
