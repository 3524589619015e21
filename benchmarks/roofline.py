"""The GPU roofline of the fused masked InfoNCE, measured on the device in the same run.

**Ideal work.** A fused forward + backward over N queries and M keys of size D needs 8·N·M·D
flops — the forward's Q·Kᵀ, and in the backward Q·Kᵀ again (it is not stored) plus dQ and dK:
four N·M·D products of 2 flops per multiply-add — and 2·N·M exponentials (forward and backward).
Its time can be no lower than the larger of flops / matmul rate and exponentials / exp rate; a
triton row is reported as that bound over its measured time, in percent (``percent_of_bound``).

**Executed work** is what the kernels actually issue, apart from the ideal (``executed_flops``):
- query/key: forward 2·N·M·D; backward dq (Q·Kᵀ again, then dS·K) and dk (Q·Kᵀ again, then
  dSᵀ·Q): 8·N·M·D; 10·N·M·D in all;
- self-contrast: the forward, then one symmetric backward kernel that computes each logit tile
  once and adds both directions' gradients with one product: 4·N·M·D; 6·N·M·D in all;
- each_positive adds a positive pass over the key ranges that hold each row chunk's positives
  (tiles aligned to the classes: about the positive logits, e.g. 13-19% of the visited ones
  with 8 classes);
- tiles whose groups never meet are skipped: every term scales with the share of visited tiles.
It is the number to compare with the tensor cores' rate when judging the kernels' own efficiency;
the ideal bound is the one to compare with other implementations.

Matrix-product rates are measured with cuBLAS (bf16, and fp32 with TF32 tensor cores); the exp
rate with a Triton kernel that chains ``exp2`` in registers, so that memory traffic does not hide
the special-function units. The kernels compute fp32 products as three TF32 products (float32
accuracy; one when ``torch.backends.cuda.matmul.allow_tf32`` is set), so an fp32 row's bound
counts three times the flops at the TF32 rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import triton
import triton.language as tl

MATMUL_SIZE = 8192


@dataclass(frozen=True)
class DeviceRates:
    bf16_flops_per_s: float
    tf32_flops_per_s: float
    exp_per_s: float

    def to_json(self) -> dict:
        return asdict(self)


def fused_work(n: int, m: int, d: int) -> tuple[float, float]:
    """(flops, exponentials) that one fused forward + backward needs: the ideal bound's work."""
    return 8.0 * n * m * d, 2.0 * n * m


def executed_flops(n: int, m: int, d: int, *, self_contrast: bool, denominator: str = "all",
                   visited: float = 1.0, positive_share: float = 0.0) -> float:
    """Matrix-product flops the kernels issue for one forward + backward.

    ``visited``: share of the N x M tile pairs the kernels visit (below 1 when groups skip tiles);
    ``positive_share``: the logits each_positive's positive pass computes, as a share of the
    visited ones (``benchmarks/sass_budget.py::hot_loop_weights`` gives it per layout)."""
    product = 2.0 * n * m * d * visited
    forward = product * (1.0 + (positive_share if denominator == "each_positive" else 0.0))
    backward = 2 * product if self_contrast else 4 * product
    return forward + backward


def bound_seconds(rates: DeviceRates, n: int, m: int, d: int, dtype: str) -> float:
    flops, exps = fused_work(n, m, d)
    if dtype in ("bfloat16", "float16"):
        matmul_s = flops / rates.bf16_flops_per_s
    else:
        products = 1 if torch.backends.cuda.matmul.allow_tf32 else 3
        matmul_s = products * flops / rates.tf32_flops_per_s
    return max(matmul_s, exps / rates.exp_per_s)


def percent_of_bound(rates: DeviceRates, n: int, m: int, d: int, dtype: str, seconds: float) -> float:
    return 100.0 * bound_seconds(rates, n, m, d, dtype) / seconds


def _median_seconds(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3


def matmul_rate(dtype: torch.dtype, size: int = MATMUL_SIZE) -> float:
    """Flops per second of a size³ matrix product (fp32 runs on TF32 tensor cores)."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        seconds = _median_seconds(lambda: a @ b)
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    return 2.0 * size**3 / seconds


@triton.jit
def exp_chain(x_ptr, out_ptr, ITERATIONS: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    for _ in range(ITERATIONS):
        x = tl.exp2(-x)  # stays in (0, 1]: no overflow, and no step can be folded away
    tl.store(out_ptr + offsets, x)


def run_exp_chain(x: torch.Tensor, iterations: int, block: int = 1024) -> torch.Tensor:
    out = torch.empty_like(x)
    exp_chain[(x.numel() // block,)](x, out, ITERATIONS=iterations, BLOCK=block)
    return out


def exp_rate(elements: int = 1 << 24, iterations: int = 256) -> float:
    """exp2 evaluations per second of the device's special-function units."""
    x = torch.rand(elements, device="cuda")
    return elements * iterations / _median_seconds(lambda: run_exp_chain(x, iterations))


def measure_rates() -> DeviceRates:
    return DeviceRates(matmul_rate(torch.bfloat16), matmul_rate(torch.float32), exp_rate())
