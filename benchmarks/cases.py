"""What is benchmarked: input recipes, the sizes of each scale, and the providers of each case.

A *case* builds the inputs of one loss from ``(n, d, dtype, device)``; ``n`` is the number of
query rows (N = M). A *provider* computes that loss's value from those inputs in its own way:

* ``reference`` — contrastkit's dense eager path (``backend="reference"``);
* ``compiled`` — ``torch.compile`` of the same dense math;
* ``torch`` — the chunked, memory-lean path (``backend="torch"``);
* ``triton`` — the fused kernels (``backend="triton"``), CUDA only;
* peers that compute the same value: pytorch-metric-learning's ``SupConLoss`` and
  ``NTXentLoss``, and the seed papers' own formulations (:mod:`benchmarks.seeds`).

Every provider takes the inputs (those in ``Case.grad_inputs`` are fresh leaves that require
grad) and returns the scalar loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from einops import rearrange

from benchmarks import seeds
from contrastkit import CrossLevelContrast, InfoNCEOptions, PseudoLabelContrast, info_nce
from contrastkit._options import OpInputs
from contrastkit._reference import dense_rows
from contrastkit.core import reduce_rows

SUPCON_CLASSES = 8
MAP_CLASSES = 4  # background + 3 foreground classes
MAP_BATCH = 8
GRID = 16  # cross-level: a 16x16 grid of cells per image
CROSS_LEVEL_TAU = 0.07
TAU = 0.1

Provider = Callable[[dict], torch.Tensor]


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    build: Callable[..., dict]
    grad_inputs: tuple[str, ...]
    providers: dict[str, Provider]
    # the eager dense math that "compiled" compiles, or why there is none
    dense: Callable[..., torch.Tensor] | str
    sizes: dict[str, tuple[int, ...]]  # scale -> n
    dims: dict[str, tuple[int, ...]]  # scale -> d
    dtypes: dict[str, tuple[str, ...]]  # scale -> dtype names
    # (scale, provider) -> (largest n run, why): peers too slow to sweep on a small CPU
    limits: dict[tuple[str, str], tuple[int, str]] = field(default_factory=dict)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, g, dtype, device):
    return torch.randn(shape, generator=g).to(device=device, dtype=dtype)


def _map_shape(n: int) -> tuple[int, int]:
    """(B, H=W) of a map case with n pixels: B = 8 images of square maps."""
    side = math.isqrt(n // MAP_BATCH)
    if MAP_BATCH * side * side != n:
        raise ValueError(f"map cases need n = {MAP_BATCH}·H² pixels; got {n}")
    return MAP_BATCH, side


# --- info_nce: self-contrast SupCon -------------------------------------------------------------

def supcon_inputs(n, d, dtype, device, seed=0):
    g = _generator(seed)
    return {"query": _randn((n, d), g, dtype, device),
            "labels": torch.randint(0, SUPCON_CLASSES, (n,), generator=g).to(device)}


def _supcon_backend(backend):
    return lambda x: info_nce(x["query"], labels=x["labels"], temperature=TAU, denominator="all",
                              backend=backend)


def _tau(value, like):
    return torch.full((), value, dtype=torch.float64 if like.dtype == torch.float64 else torch.float32,
                      device=like.device)


def supcon_dense(query, labels):
    inputs = OpInputs(query, query, labels, labels, None, None, _tau(TAU, query))
    loss, valid = dense_rows(inputs, InfoNCEOptions(self_key_offset=0))
    return reduce_rows(loss, valid, None, "mean")


def _pml_supcon():
    from pytorch_metric_learning.losses import SupConLoss

    loss = SupConLoss(temperature=TAU)
    return lambda x: loss(x["query"], x["labels"])


# --- info_nce: paired NT-Xent (SimCLR) as self-contrast over both views --------------------------

def ntxent_inputs(n, d, dtype, device, seed=0):
    g = _generator(seed)
    return {"view1": _randn((n // 2, d), g, dtype, device), "view2": _randn((n // 2, d), g, dtype, device)}


def _pair_labels(x):
    pairs = torch.arange(x["view1"].shape[0], device=x["view1"].device)
    return torch.cat([pairs, pairs])


def _ntxent_backend(backend):
    return lambda x: info_nce(torch.cat([x["view1"], x["view2"]]), labels=_pair_labels(x), temperature=TAU,
                              backend=backend)


def ntxent_dense(view1, view2):
    pairs = torch.arange(view1.shape[0], device=view1.device)
    return supcon_dense(torch.cat([view1, view2]), torch.cat([pairs, pairs]))


def _pml_ntxent():
    from pytorch_metric_learning.losses import NTXentLoss

    loss = NTXentLoss(temperature=TAU)
    return lambda x: loss(torch.cat([x["view1"], x["view2"]]), _pair_labels(x))


# --- CrossLevelContrast: global cells against their own patches, negatives within the image ------

def cross_level_inputs(n, d, dtype, device, seed=0):
    cells = GRID * GRID
    if n % cells:
        raise ValueError(f"cross-level needs n to be a multiple of {cells} cells; got {n}")
    g = _generator(seed)
    return {"global_map": _randn((n // cells, d, GRID, GRID), g, dtype, device),
            "local_rows": _randn((n, d), g, dtype, device)}


def _image_ids(global_map):
    b, _, gh, gw = global_map.shape
    return torch.arange(b, device=global_map.device).repeat_interleave(gh * gw)


def _cross_level_backend(backend):
    loss = CrossLevelContrast(temperature=CROSS_LEVEL_TAU, backend=backend)
    return lambda x: loss(x["global_map"], x["local_rows"])


def cross_level_dense(global_map, local_rows):
    rows = rearrange(global_map, "b c gh gw -> (b gh gw) c")
    cells = torch.arange(rows.shape[0], device=rows.device)
    images = _image_ids(global_map)
    inputs = OpInputs(rows, local_rows.detach(), cells, cells, images, images, _tau(CROSS_LEVEL_TAU, rows))
    loss, valid = dense_rows(inputs, InfoNCEOptions())
    return reduce_rows(loss, valid, None, "mean")


# --- PseudoLabelContrast on (B, D, H, W) maps --------------------------------------------------

def pixel_inputs(n, d, dtype, device, seed=0):
    b, side = _map_shape(n)
    g = _generator(seed)
    return {"embeddings": _randn((b, d, side, side), g, dtype, device),
            "labels": torch.randint(0, MAP_CLASSES, (b, side, side), generator=g).to(device)}


def prototype_inputs(n, d, dtype, device, seed=0):
    # two augmented views per image: image i is paired with image i + B/2
    b, _ = _map_shape(n)
    return {**pixel_inputs(n, d, dtype, device, seed), "pair_index": ((torch.arange(b) + b // 2) % b).to(device)}


def _pseudo_label_backend(mode, backend):
    # num_classes spares prototype mode its one host synchronisation (and lets torch.compile trace it).
    loss = PseudoLabelContrast(temperature=TAU, mode=mode, backend=backend, num_classes=MAP_CLASSES)
    if mode == "pixel":
        return lambda x: loss(x["embeddings"], x["labels"])
    return lambda x: loss(x["embeddings"], x["labels"], pair_index=x["pair_index"])


def pixel_dense(embeddings, labels):
    rows = rearrange(embeddings, "b d h w -> (b h w) d")
    pixel_labels = torch.where(labels > 0, labels, -1).reshape(-1)  # background takes no part
    inputs = OpInputs(rows, rows, pixel_labels, pixel_labels, None, None, _tau(TAU, rows))
    loss, valid = dense_rows(inputs, InfoNCEOptions(self_key_offset=0))
    return reduce_rows(loss, valid, None, "mean")


_PROTOTYPE_DENSE = PseudoLabelContrast(temperature=TAU, num_classes=MAP_CLASSES, backend="reference")


def prototype_dense(embeddings, labels, pair_index):
    # With num_classes no shape depends on the values: the whole loss compiles.
    return _PROTOTYPE_DENSE(embeddings, labels, pair_index=pair_index)


# --- the cases --------------------------------------------------------------------------------

POW2_QUICK = (1024, 2048, 4096, 8192)
POW2_FULL = tuple(2**k for k in range(10, 17))  # 1,024 .. 65,536
MAPS_QUICK = (512, 2048)  # (8, D, 8, 8) and (8, D, 16, 16)
MAPS_FULL = (2048, 8192, 32768, 131072)  # up to (8, 128, 128, 128)
BOTH_DTYPES = ("float32", "bfloat16")
QUICK_8K = ("the quick run keeps N = 8,192 for the chunked-path target (reference and torch) to stay "
            "within 3 minutes on 2 cores")


def _backends(make):
    return {name: make(name) for name in ("reference", "torch", "triton")}


CASES: dict[str, Case] = {
    case.name: case
    for case in (
        Case("supcon8", "info_nce, self-contrast SupCon, 8 classes", supcon_inputs, ("query",),
             {**_backends(_supcon_backend), "pml_supcon": _pml_supcon()}, supcon_dense,
             {"quick": POW2_QUICK, "full": POW2_FULL}, {"quick": (128,), "full": (64, 128, 256)},
             {"quick": ("float32",), "full": BOTH_DTYPES},
             {("quick", "pml_supcon"): (4096, QUICK_8K), ("quick", "compiled"): (4096, QUICK_8K)}),
        Case("ntxent", "info_nce, paired NT-Xent (N = both views)", ntxent_inputs, ("view1", "view2"),
             {**_backends(_ntxent_backend), "pml_ntxent": _pml_ntxent()}, ntxent_dense,
             {"quick": (256, 512, 1024, 2048), "full": POW2_FULL},
             {"quick": (128,), "full": (64, 128, 256)}, {"quick": ("float32",), "full": BOTH_DTYPES},
             {("quick", "pml_ntxent"): (256, "its positive-pair x negative-pair mask grows as N³ "
                                             "(4.5 s and 2.4 GB at N=512 on 1 CPU core)")}),
        Case("cross_level", "CrossLevelContrast, 16x16 cells per image, negatives='image'",
             cross_level_inputs, ("global_map",),
             {**_backends(_cross_level_backend), "clcc_patchnce": lambda x: seeds.patch_nce(**x)},
             cross_level_dense,
             {"quick": POW2_QUICK[:3], "full": POW2_FULL}, {"quick": (128,), "full": (128,)},
             {"quick": ("float32",), "full": BOTH_DTYPES}),
        Case("pl_pixel", "PseudoLabelContrast mode='pixel', (8, D, H, W) maps, N = 8·H·W",
             pixel_inputs, ("embeddings",),
             _backends(lambda b: _pseudo_label_backend("pixel", b)), pixel_dense,
             {"quick": MAPS_QUICK, "full": MAPS_FULL}, {"quick": (128,), "full": (128,)},
             {"quick": ("float32",), "full": BOTH_DTYPES}),
        Case("pl_prototype", "PseudoLabelContrast mode='prototype', (8, D, H, W) maps, N = 8·H·W",
             prototype_inputs, ("embeddings",),
             {**_backends(lambda b: _pseudo_label_backend("prototype", b)),
              "seed_class_loop": lambda x: seeds.prototype_loop(**x)},
             prototype_dense,
             {"quick": MAPS_QUICK, "full": MAPS_FULL}, {"quick": (128,), "full": (128,)},
             {"quick": ("float32",), "full": BOTH_DTYPES}),
    )
}

PROVIDER_ORDER = ("reference", "compiled", "torch", "triton", "pml_supcon", "pml_ntxent", "clcc_patchnce",
                  "seed_class_loop")


def provider_names(case: Case) -> list[str]:
    names = [*case.providers, "compiled"]
    return sorted(names, key=PROVIDER_ORDER.index)


def unavailable_reason(case: Case, provider: str, n: int, scale: str, device: str) -> str | None:
    """Why a provider is not run at this size on this device, or None."""
    limit = case.limits.get((scale, provider))
    if limit is not None and n > limit[0]:
        return f"not run above N={limit[0]} at {scale} scale: {limit[1]}"
    if provider == "compiled" and isinstance(case.dense, str):
        return case.dense
    if provider != "triton":
        return None
    if device != "cuda":
        return "the Triton kernels run on CUDA GPUs only"
    from contrastkit import kernels

    return kernels.unavailable_reason()


_COMPILED: dict[str, Callable] = {}


def get_provider(case: Case, provider: str, device: str = "cpu") -> Provider:
    if provider != "compiled":
        return case.providers[provider]
    if case.name not in _COMPILED:
        # On a CPU, one shape-generic compile per case keeps the quick run short; on a GPU
        # compile specialises as usual (a recompile marks changing sizes dynamic).
        _COMPILED[case.name] = torch.compile(case.dense, dynamic=True if device == "cpu" else None)
    compiled = _COMPILED[case.name]
    return lambda x: compiled(**x)


def leaf_inputs(case: Case, inputs: dict, requires_grad: bool = True) -> dict:
    """The inputs with fresh leaves for the differentiable ones (sharing their storage)."""
    return {k: v.detach().requires_grad_(requires_grad) if k in case.grad_inputs else v for k, v in inputs.items()}


def run_provider(case: Case, provider: Provider, inputs: dict, backward: bool) -> torch.Tensor:
    """One training forward (inputs require grad), and the backward too when asked."""
    loss = provider(leaf_inputs(case, inputs))
    if backward:
        loss.backward()
    return loss.detach()


def sweep(scale: str):
    """(case, n, d, dtype) of a scale, smallest first within each case."""
    for case in CASES.values():
        for dtype in case.dtypes[scale]:
            for d in case.dims[scale]:
                for n in case.sizes[scale]:
                    yield case, n, d, dtype
