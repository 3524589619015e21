"""torch.compile(fullgraph=True) traces losses built on info_nce and the kernels without a graph break.

fullgraph=True turns any graph break into an error. On the CPU the "aot_eager" compiler
checks tracing, the fake implementations and the compiled autograd without waiting for
C++ code generation; on a GPU the default inductor compiler runs the Triton backend.
"""

from __future__ import annotations

import pytest
import torch

from contrastkit import info_nce

HAS_CUDA = torch.cuda.is_available()


def supcon_loss(backend):
    def loss_fn(features, labels, weights):
        # A pixel loss on a (B, C, H, W) map, as the segmentation losses use it.
        return 2.0 * info_nce(features, labels=labels, weights=weights, temperature=0.2,
                              denominator="each_positive", backend=backend)

    return loss_fn


def compiled_matches_eager(backend, device, compiler):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 24, 4, 5, generator=g).to(device)
    labels = torch.randint(-1, 3, (40,), generator=g).to(device)
    weights = torch.rand(40, generator=g).to(device)
    results = []
    for fn in (supcon_loss(backend), torch.compile(supcon_loss(backend), fullgraph=True, backend=compiler)):
        leaf = features.clone().requires_grad_(True)
        loss = fn(leaf, labels, weights)
        (grad,) = torch.autograd.grad(loss, leaf)
        results.append((loss.detach(), grad))
    (eager_loss, eager_grad), (loss, grad) = results
    assert torch.allclose(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_compile_torch_backend_cpu():
    compiled_matches_eager("torch", "cpu", "aot_eager")


def test_compile_triton_backend_through_interpreter():
    if HAS_CUDA:
        pytest.skip("the interpreter is used only without a GPU")
    compiled_matches_eager("triton", "cpu", "aot_eager")


def test_compile_pool_patches():
    from contrastkit.kernels import pool_patches

    device = "cuda" if HAS_CUDA else "cpu"
    x = torch.randn(2, 8, 4, 6, device=device, requires_grad=True)
    fn = torch.compile(lambda t: pool_patches(t, 2, 3, True).square().sum(), fullgraph=True,
                       backend="inductor" if HAS_CUDA else "aot_eager")
    (grad,) = torch.autograd.grad(fn(x), x)
    (want,) = torch.autograd.grad(pool_patches(x, 2, 3, True).square().sum(), x)
    assert torch.allclose(grad, want, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compile_on_gpu_inductor(backend):
    compiled_matches_eager(backend, "cuda", "inductor")
