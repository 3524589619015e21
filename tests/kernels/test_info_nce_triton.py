"""The fused Triton InfoNCE against an independent float64 implementation.

Sizes cover tile edges (N = 1, 37, 130; M = 1, 53, 257; D = 3, 24, 130 against tiles of 32
under the interpreter); a covering set of cases exercises every option once or more, each
dtype, feature-map input and degenerate rows, instead of a full cartesian product.
"""

from __future__ import annotations

import pytest
import torch

from contrastkit import SHARED, InfoNCEOptions, info_nce

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

IGNORE = -1


def float64_rows(q, k, labels, key_labels, groups, key_groups, self_offset, tau, normalize, denominator):
    """Per-row loss and contributing mask, written directly from the definition, in float64."""
    q, k = q.double(), k.double()
    if normalize:
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = q @ k.T / tau
    n, m = s.shape
    cand = (labels[:, None] != IGNORE) & (key_labels[None, :] != IGNORE)
    if groups is not None:
        cand &= ((groups[:, None] == key_groups[None, :]) | (groups[:, None] == SHARED)
                 | (key_groups[None, :] == SHARED))
    if self_offset is not None:
        cand &= torch.arange(n)[:, None] + self_offset != torch.arange(m)[None, :]
    pos = cand & (labels[:, None] == key_labels[None, :])
    neg = cand & ~pos
    losses, valid = [], []
    for i in range(n):
        p, ng = pos[i].nonzero().flatten(), neg[i].nonzero().flatten()
        ok = labels[i] != IGNORE and len(p) > 0 and (denominator != "negatives" or len(ng) > 0)
        valid.append(bool(ok))
        if not ok:
            losses.append(s[i].sum() * 0)  # zero, still on the graph for autograd.grad
            continue
        row = s[i]
        terms = []
        for j in p:
            if denominator == "all":
                log_den = torch.logsumexp(row[cand[i]], 0)
            elif denominator == "negatives":
                log_den = torch.logsumexp(row[ng], 0)
            else:
                log_den = torch.logsumexp(torch.cat([row[j:j + 1], row[ng]]), 0)
            terms.append(log_den - row[j])
        losses.append(torch.stack(terms).mean())
    return torch.stack(losses), torch.tensor(valid)


def as_rows(x):
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x


TOL = {torch.float32: (2e-5, 2e-4), torch.bfloat16: (2e-4, 3e-2), torch.float16: (2e-4, 8e-3)}


def assert_close(actual, expected, tol, what):
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    actual, expected = actual.double().cpu(), expected.double().cpu()
    err = (actual - expected).abs().max().item()
    bound = tol * (1.0 + expected.abs().max().item())
    assert err <= bound, f"{what}: max error {err:.3g} > {bound:.3g}"


def make_case(mode, n, m, d, dtype, classes=4, ignore_frac=0.0, with_groups=False, offset=None, seed=0,
              shared=0.0):
    g = torch.Generator().manual_seed(seed)

    def ids(count, hi):
        x = torch.randint(0, hi, (count,), generator=g)
        if ignore_frac:
            x[torch.rand(count, generator=g) < ignore_frac] = IGNORE
        return x

    q = torch.randn(n, d, generator=g).to(dtype)
    case = dict(labels=None, key_labels=None, groups=None, key_groups=None, self_key_offset=None)
    if mode == "self":
        k = None
        case["labels"] = ids(n, classes)
        if with_groups:
            case["groups"] = ids(n, 2).clamp_min(0)
    elif mode == "paired":
        k = torch.randn(n, d, generator=g).to(dtype)
        if with_groups:
            case["groups"] = torch.randint(0, 2, (n,), generator=g)
    else:
        k = torch.randn(m, d, generator=g).to(dtype)
        case["labels"], case["key_labels"] = ids(n, classes), ids(m, classes)
        if with_groups:
            case["groups"], case["key_groups"] = ids(n, 2).clamp_min(0), ids(m, 2).clamp_min(0)
        if offset is not None:
            k[offset:offset + n] = q
            case["key_labels"][offset:offset + n] = case["labels"]
            if with_groups:
                case["key_groups"][offset:offset + n] = case["groups"]
            case["self_key_offset"] = offset
    if shared:  # rows in every group, on whichever side has its own group ids
        side = "groups" if case["key_groups"] is None else "key_groups"
        case[side][torch.rand(case[side].shape[0], generator=g) < shared] = SHARED
        case[side][-1] = SHARED
    return q, k, case


def expected_rows(q, k, case, tau, normalize, denominator):
    qr = as_rows(q)
    kr = qr if k is None else as_rows(k)
    labels, key_labels = case["labels"], case["key_labels"]
    groups, key_groups = case["groups"], case["key_groups"]
    offset = case["self_key_offset"]
    if k is None:
        key_labels, key_groups, offset = labels, groups, 0
    elif labels is None:
        labels = key_labels = torch.arange(qr.shape[0])
        key_groups = groups
    return float64_rows(qr, kr, labels, key_labels, groups, key_groups, offset, tau, normalize, denominator)


def run_and_compare(q, k, case, dtype, denominator, tau=0.1, normalize=True, tensor_tau=False):
    """Per-row losses and the gradients of query and key (with a random upstream) vs float64; with
    ``tensor_tau`` the temperature is a leaf tensor and its gradient is compared too."""
    up = torch.rand(as_rows(q).shape[0], generator=torch.Generator().manual_seed(1)) + 0.5
    leaves = [q.detach().requires_grad_(True)] + ([] if k is None else [k.detach().requires_grad_(True)])
    dev = [x.to(DEVICE).detach().requires_grad_(True) for x in leaves]
    ids = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in case.items()}
    tau_leaf = torch.tensor(tau, device=DEVICE, requires_grad=True) if tensor_tau else tau
    rows = info_nce(dev[0], None if k is None else dev[1], **ids, temperature=tau_leaf, normalize=normalize,
                    denominator=denominator, reduction="none", backend="triton")
    assert rows.dtype == torch.float32
    grads = torch.autograd.grad((rows * up.to(DEVICE)).sum(), dev + ([tau_leaf] if tensor_tau else []),
                                allow_unused=True)

    ref_leaves = [x.detach().double().requires_grad_(True) for x in leaves]
    ref_tau = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    want, valid = expected_rows(ref_leaves[0], None if k is None else ref_leaves[1], case, ref_tau, normalize,
                                denominator)
    ref_grads = torch.autograd.grad((want * up.double()).sum(), ref_leaves + ([ref_tau] if tensor_tau else []),
                                    allow_unused=True)

    loss_tol, grad_tol = TOL[dtype]
    assert_close(rows, want.detach(), loss_tol, "per-row loss")
    assert torch.equal(rows.detach().cpu() != 0, valid & (want.detach() != 0))
    for name, leaf, got, ref in zip(("query", "key"), leaves, grads, ref_grads, strict=False):
        assert got.shape == leaf.shape and got.dtype == dtype
        assert_close(got, ref, grad_tol, f"grad of {name}")
    if tensor_tau:
        assert grads[-1].shape == () and ref_grads[-1].abs() > 1e-3
        assert_close(grads[-1], ref_grads[-1], grad_tol, "grad of temperature")
    return rows, valid


CASES = [
    # mode, N, M, D, dtype, denominator, extra
    ("self", 37, None, 24, torch.float32, "all", {}),
    ("self", 130, None, 130, torch.float32, "each_positive", dict(with_groups=True)),
    ("self", 1, None, 3, torch.float32, "all", {}),
    ("self", 130, None, 3, torch.bfloat16, "negatives", dict(ignore_frac=0.3)),
    ("qk", 37, 53, 3, torch.float32, "negatives", dict(ignore_frac=0.2)),
    ("qk", 130, 257, 24, torch.bfloat16, "all", dict(with_groups=True, ignore_frac=0.1)),
    ("qk", 1, 257, 130, torch.float16, "each_positive", {}),
    ("qk", 130, 1, 24, torch.float32, "negatives", dict(classes=2)),
    ("qk", 37, 1, 130, torch.float16, "all", dict(classes=1)),
    ("qk", 37, 257, 24, torch.float32, "each_positive", dict(offset=100, with_groups=True)),
    ("qk", 130, 257, 3, torch.float16, "all", dict(offset=0, ignore_frac=0.2)),
    ("paired", 37, None, 130, torch.bfloat16, "all", {}),
    ("paired", 130, None, 3, torch.float16, "negatives", dict(with_groups=True)),
    ("paired", 1, None, 24, torch.float32, "each_positive", {}),
    # keys shared by every group, and a learnable (tensor) temperature
    ("qk", 130, 257, 24, torch.float32, "all", dict(with_groups=True, shared=0.2, tensor_tau=True)),
    ("qk", 37, 53, 3, torch.bfloat16, "each_positive", dict(with_groups=True, shared=0.3, ignore_frac=0.2)),
    ("self", 130, None, 24, torch.float32, "negatives", dict(with_groups=True, shared=0.1, tensor_tau=True)),
    ("qk", 37, 257, 24, torch.float16, "each_positive", dict(offset=100, tensor_tau=True)),
    ("paired", 37, None, 24, torch.float32, "all", dict(with_groups=True, shared=0.3, tensor_tau=True)),
]


@pytest.mark.parametrize("mode,n,m,d,dtype,denominator,extra", CASES)
def test_matches_float64(mode, n, m, d, dtype, denominator, extra):
    extra = dict(extra)
    tensor_tau = extra.pop("tensor_tau", False)
    q, k, case = make_case(mode, n, m, d, dtype, **extra)
    run_and_compare(q, k, case, dtype, denominator, tau=0.2 if tensor_tau else 0.1, tensor_tau=tensor_tau)


def test_temperature_gradient_from_the_key_kernel_alone():
    # Queries frozen: only the dk kernel runs, and its epilogue gives the temperature's gradient.
    q, k, case = make_case("qk", 37, 53, 24, torch.float32, with_groups=True, shared=0.2)
    ids = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in case.items()}
    grads = {}
    for backend in ("triton", "reference"):
        dtype = torch.float32 if backend == "triton" else torch.float64
        kk = k.to(DEVICE, dtype).requires_grad_(True)
        tau = torch.tensor(0.3, device=DEVICE, dtype=dtype, requires_grad=True)
        loss = info_nce(q.to(DEVICE, dtype), kk, **ids, temperature=tau, backend=backend)
        grads[backend] = torch.autograd.grad(loss, (kk, tau))
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        assert_close(got, want, 2e-4, "gradient")
    # and only the temperature (embeddings frozen): the dq kernel runs for it
    tau = torch.tensor(0.3, device=DEVICE, requires_grad=True)
    loss = info_nce(q.to(DEVICE), k.to(DEVICE), **ids, temperature=tau, backend="triton")
    assert_close(torch.autograd.grad(loss, tau)[0], grads["reference"][1], 2e-4, "gradient of tau alone")


@pytest.mark.parametrize("field, value", [("denominator", "each_positive"), ("normalize", False),
                                          ("ignore_index", 2), ("self_key_offset", 3)])
def test_every_option_reaches_the_kernels(field, value):
    from contrastkit.kernels.info_nce import Settings

    from contrastkit._triton import NOT_FOR_KERNELS

    # Each option is a kernel setting or one the kernels do not read; every setting is one case here.
    assert set(Settings._fields) | set(NOT_FOR_KERNELS) == set(InfoNCEOptions.__dataclass_fields__)
    assert set(Settings._fields) == {"denominator", "normalize", "ignore_index", "self_key_offset"}
    q, k, case = make_case("qk", 13, 17, 5, torch.float32, offset=3)
    ids = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in case.items()}
    if field != "self_key_offset":
        ids["self_key_offset"] = None
    ids["key_labels"][0] = 2
    base = info_nce(q.double(), k.double(), **{**ids, "self_key_offset": None}, reduction="none",
                    backend="reference")
    want = info_nce(q.double(), k.double(), **{**ids, field: value} if field != "self_key_offset" else ids,
                    reduction="none", backend="reference")
    assert not torch.allclose(base, want)
    got = info_nce(q.to(DEVICE), k.to(DEVICE), **{**ids, field: value} if field != "self_key_offset" else ids,
                   reduction="none", backend="triton")
    assert_close(got, want, 2e-5, field)


@pytest.mark.parametrize("denominator", ["all", "each_positive", "negatives"])
@pytest.mark.parametrize("mode", ["qk", "self"])
def test_unnormalized_large_logits_stay_finite(mode, denominator):
    # Without normalisation logits reach thousands: the online log-sum-exp must not overflow, and the
    # symmetric backward's one-exponential tiles (self) give way to masked ones where the rows'
    # log-sum-exps spread too far (tests/kernels/test_plan.py checks the demotion itself).
    q, k, case = make_case(mode, 37, 53, 24, torch.float32, classes=3)
    run_and_compare(q * 4, None if k is None else k * 4, case, torch.float32, denominator, tau=0.5, normalize=False)


@pytest.mark.parametrize("mode", ["qk", "self"])
def test_rows_of_huge_norm_normalise_like_unit_rows(mode):
    # A float32 row of norm 1e25 has an infinite sum of squares: the gather kernel divides by the
    # row's largest entry first, so loss and gradient (times the scale) are those of unit rows.
    q, k, case = make_case(mode, 37, 53, 24, torch.float32, classes=3)
    scale = torch.logspace(19, 30, 37)[:, None]

    def run(factor):
        leaves = [x.to(DEVICE).detach().requires_grad_(True) for x in (q * factor, None if k is None else k * 1e25)
                  if x is not None]
        ids = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in case.items()}
        rows = info_nce(leaves[0], None if k is None else leaves[1], **ids, reduction="none", backend="triton")
        rows.sum().backward()
        return rows.detach().cpu(), [x.grad.cpu() for x in leaves]

    huge_rows, huge_grads = run(scale)
    unit_rows, unit_grads = run(1.0)
    assert torch.isfinite(huge_rows).all()
    torch.testing.assert_close(huge_rows, unit_rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(huge_grads[0] * scale, unit_grads[0], rtol=1e-3, atol=1e-5)


def test_feature_maps_read_through_strides():
    g = torch.Generator().manual_seed(3)
    # A (B, C, H, W) map in NCHW, and a channels_last map as keys: neither is permuted or copied.
    q = torch.randn(2, 24, 3, 7, generator=g).to(torch.bfloat16)
    k = torch.randn(1, 24, 7, 9, generator=g).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    case = dict(labels=torch.randint(-1, 3, (42,), generator=g), groups=None, key_groups=None,
                key_labels=torch.randint(0, 3, (63,), generator=g), self_key_offset=None)
    run_and_compare(q, k, case, torch.bfloat16, "all")


def test_self_contrast_feature_map_with_groups():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 130, 4, 5, generator=g)
    case = dict(labels=torch.randint(-1, 3, (40,), generator=g), key_labels=None,
                groups=torch.arange(2).repeat_interleave(20), key_groups=None, self_key_offset=None)
    run_and_compare(q, None, case, torch.float32, "each_positive")


def test_non_contiguous_rows():
    q, k, case = make_case("qk", 37, 53, 24, torch.float32)
    run_and_compare(q.T.contiguous().T, k[:, :].T.contiguous().T, case, torch.float32, "all")


@pytest.mark.parametrize("denominator", ["all", "each_positive", "negatives"])
def test_degenerate_rows_are_zero_and_finite(denominator):
    # All queries ignored, or every label unique (no positives): nothing contributes.
    for labels in (torch.full((37,), IGNORE), torch.arange(37)):
        q = torch.randn(37, 24, device=DEVICE, requires_grad=True)
        kwargs = dict(labels=labels.to(DEVICE), denominator=denominator, backend="triton")
        mean, rows = info_nce(q, **kwargs), info_nce(q, **kwargs, reduction="none")
        (grad,) = torch.autograd.grad(mean + rows.sum(), q)
        assert mean.item() == 0.0 and torch.count_nonzero(rows) == 0
        assert torch.isfinite(grad).all() and torch.count_nonzero(grad) == 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_and_reductions_match_reference(reduction):
    q, k, case = make_case("qk", 37, 53, 24, torch.float32, ignore_frac=0.2, seed=5)
    w = torch.rand(37, generator=torch.Generator().manual_seed(6))
    out = {}
    for backend in ("triton", "reference"):
        qq = q.to(DEVICE).requires_grad_(True)
        val = info_nce(qq, k.to(DEVICE), labels=case["labels"].to(DEVICE), weights=w.to(DEVICE),
                       key_labels=case["key_labels"].to(DEVICE), reduction=reduction,
                       denominator="each_positive", backend=backend)
        (grad,) = torch.autograd.grad(val.sum(), qq)
        out[backend] = (val.detach(), grad)
    assert_close(out["triton"][0], out["reference"][0], 2e-5, "loss")
    assert_close(out["triton"][1], out["reference"][1], 2e-4, "grad")


def test_backward_is_deterministic():
    q, k, case = make_case("qk", 130, 257, 24, torch.float32, seed=7)
    grads = []
    for _ in range(2):
        qq, kk = q.to(DEVICE).requires_grad_(True), k.to(DEVICE).requires_grad_(True)
        loss = info_nce(qq, kk, labels=case["labels"].to(DEVICE), key_labels=case["key_labels"].to(DEVICE),
                        backend="triton")
        grads.append(torch.autograd.grad(loss, (qq, kk)))
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1], strict=True))


def test_autocast_bf16_model_outputs():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(37, 16, generator=g, device="cpu").to(DEVICE)
    layer = torch.nn.Linear(16, 24).to(DEVICE)
    labels = torch.randint(0, 3, (37,), generator=g).to(DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        emb = layer(x)
        loss = info_nce(emb, labels=labels, backend="triton")
    assert emb.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    want = info_nce(emb.detach().double(), labels=labels, backend="reference")
    assert abs(loss.item() - want.item()) < 1e-3
    assert torch.isfinite(layer.weight.grad).all() and layer.weight.grad.abs().sum() > 0


def test_float64_is_rejected_with_a_pointer_to_torch():
    q = torch.randn(5, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='torch'"):
        info_nce(q, labels=torch.zeros(5, dtype=torch.long, device=DEVICE), backend="triton")


@pytest.mark.parametrize("dtype,largest", [(torch.float32, 512), (torch.bfloat16, 1024), (torch.float16, 1024)])
def test_too_large_embedding_is_rejected(dtype, largest):
    q = torch.randn(2, largest + 1, device=DEVICE).to(dtype)
    with pytest.raises(ValueError, match=f"D <= {largest}"):
        info_nce(q, labels=torch.zeros(2, dtype=torch.long, device=DEVICE), backend="triton")


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    import contrastkit.kernels.info_nce as module

    monkeypatch.setattr(module, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        info_nce(torch.randn(4, 8), labels=torch.zeros(4, dtype=torch.long), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("denominator", ["all", "each_positive", "negatives"])
def test_large_on_gpu(dtype, denominator):
    g = torch.Generator().manual_seed(9)
    n, d = 4099, 128
    q = torch.randn(n, d, generator=g).to(dtype).cuda().requires_grad_(True)
    k = torch.randn(n + 5, d, generator=g).to(dtype).cuda().requires_grad_(True)
    labels = torch.randint(-1, 20, (n,), generator=g).cuda()
    key_labels = torch.randint(0, 20, (n + 5,), generator=g).cuda()
    kwargs = dict(labels=labels, key_labels=key_labels, denominator=denominator, reduction="none")
    rows = info_nce(q, k, backend="triton", **kwargs)
    qd, kd = q.detach().double().requires_grad_(True), k.detach().double().requires_grad_(True)
    want = info_nce(qd, kd, backend="reference", **kwargs)
    grads = torch.autograd.grad(rows.sum(), (q, k))
    ref = torch.autograd.grad(want.sum(), (qd, kd))
    loss_tol, grad_tol = TOL[dtype]
    assert_close(rows, want.detach(), 1e-4 if dtype == torch.float32 else loss_tol, "rows")
    for got, exp in zip(grads, ref, strict=True):
        assert_close(got, exp, grad_tol, "grad")


def test_availability_and_support(monkeypatch):
    import contrastkit.kernels as kernels

    assert kernels.unavailable_reason() is None and kernels.available()
    assert kernels.supports(torch.bfloat16, 1024) and not kernels.supports(torch.float64, 8)
    assert kernels.supports(torch.float32, 512) and not kernels.supports(torch.float32, 513)
    assert not kernels.supports(torch.float16, 1025)
    if not torch.cuda.is_available():
        monkeypatch.setattr(kernels, "interpreting", lambda: False)
        assert "CUDA" in kernels.unavailable_reason() and not kernels.available()


def test_shapes_shrink_until_they_fit_the_gpu(monkeypatch):
    """A tuned shape that needs more shared memory than the GPU has is shrunk and remembered."""
    import contrastkit.kernels.info_nce as module
    from triton.runtime.errors import OutOfResources

    monkeypatch.setattr(module, "interpreting", lambda: False)
    monkeypatch.setattr(module, "_SHRUNK", {})
    assert module.smaller_blocks((128, 64, 8, 3)) == (128, 64, 8, 2)
    assert module.smaller_blocks((128, 64, 8, 1)) == (64, 64, 8, 2)
    assert module.smaller_blocks((32, 64, 4, 1)) == (32, 32, 4, 2)
    assert module.smaller_blocks((16, 16, 4, 1)) is None

    assert module.smaller_blocks((64, 64, 4, 1)) == (32, 32, 4, 2)  # square tiles stay square
    launches = []

    class FakeKernel:
        """Runs only tiles of at most 64 x 64 in one stage: the budget of a small GPU."""

        def __getitem__(self, grid):
            def launch(*args, BLOCK_N, BLOCK_M, D_PAD, num_warps, num_stages, **flags):
                launches.append((grid, BLOCK_N, BLOCK_M, num_stages))
                if BLOCK_N * BLOCK_M > 64 * 64 or num_stages > 1:
                    raise OutOfResources(BLOCK_N * BLOCK_M * num_stages, 64 * 64, "shared memory")
            return launch

    tuned = module._blocks("forward", 128, 4)
    assert tuned == module.GPU_BLOCKS[4]["forward"][128]
    by_queries = lambda block_n, block_m: (((1000 + block_n - 1) // block_n,), ())  # noqa: E731
    module._launch(FakeKernel(), "forward", 128, 4, by_queries, {})
    grid, block_n, block_m, stages = launches[-1]
    assert block_n * block_m <= 64 * 64 and stages == 1 and grid == ((1000 + block_n - 1) // block_n,)
    # Later launches start from the shape that fitted; other kernels and sizes keep theirs.
    assert module._blocks("forward", 128, 4) == (block_n, block_m, tuned[2], 1)
    assert module._blocks("forward", 128, 2) == module.GPU_BLOCKS[2]["forward"][128]
    count = len(launches)
    module._launch(FakeKernel(), "forward", 100, 4, by_queries, {})
    assert len(launches) == count + 1

    class NeverFits:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(1, 0, "shared memory")
            return launch

    with pytest.raises(OutOfResources):
        module._launch(NeverFits(), "backward_key", 1024, 2, by_queries, {})


@pytest.mark.parametrize("denominator", ["all", "each_positive", "negatives"])
@pytest.mark.parametrize("mode", ["self", "qk"])
def test_rows_sorted_by_group_skip_tiles_and_match(mode, denominator):
    """Per-image groups in image order (the cross-level layout): most tile pairs are skipped.

    Uneven group sizes put group boundaries inside tiles and tiles inside groups; one group
    appears only among the keys, and the float64 reference must still be matched exactly.
    """
    g = torch.Generator().manual_seed(5)
    q_sizes, k_sizes = [7, 40, 1, 33, 49], [12, 61, 0, 90, 70, 24]
    groups = torch.repeat_interleave(torch.arange(5), torch.tensor(q_sizes))
    n, d = groups.numel(), 24
    q = torch.randn(n, d, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = IGNORE
    if mode == "self":
        k, case = None, dict(labels=labels, key_labels=None, groups=groups, key_groups=None, self_key_offset=None)
    else:
        key_groups = torch.repeat_interleave(torch.arange(6), torch.tensor(k_sizes))
        k = torch.randn(key_groups.numel(), d, generator=g)
        case = dict(labels=labels, key_labels=torch.randint(0, 3, (key_groups.numel(),), generator=g),
                    groups=groups, key_groups=key_groups, self_key_offset=None)
    rows, valid = run_and_compare(q, k, case, torch.float32, denominator)
    assert valid.sum() > n // 2


@pytest.fixture
def launches(monkeypatch):
    """kind -> (grid, args) of each kernel launch of the test, as the launcher builds them."""
    import contrastkit.kernels.info_nce as module

    seen = {}
    launch = module._launch

    def spy(kernel, kind, d_pad, element_size, args_for, flags):
        def recording(block_n, block_m):
            seen[kind] = args_for(block_n, block_m)
            return seen[kind]
        return launch(kernel, kind, d_pad, element_size, recording, flags)

    monkeypatch.setattr(module, "_launch", spy)
    return seen


def int_table(args, width: int) -> torch.Tensor:
    """The launch argument that is an int32 table of ``width`` columns (tile counts, chunks)."""
    return next(a for a in args if isinstance(a, torch.Tensor) and a.dtype == torch.int32 and a.dim() == 2
                and a.shape[1] == width).cpu()


def chunk_count(args) -> int:
    """The positive pass's chunk count (a one-element int32 launch argument)."""
    return next(a for a in args if isinstance(a, torch.Tensor) and a.shape == (1,) and a.dtype == torch.int32).item()


def test_each_positive_pass_covers_every_kind_of_chunk(launches):
    """each_positive's positive pass on a layout with every kind of chunk: a large class (exact chunks,
    no label compare), runs of small classes (label compare), SHARED keys (a second key range) and a
    large SHARED class of one label (every key in range, label compare) — against float64."""
    g = torch.Generator().manual_seed(7)
    n, m, d = 150, 170, 24
    labels = torch.cat([torch.zeros(90, dtype=torch.int64), torch.randint(1, 8, (n - 90,), generator=g)])
    groups = torch.cat([torch.full((40,), SHARED), torch.zeros(50, dtype=torch.int64),
                        torch.randint(0, 2, (n - 90,), generator=g)])
    labels[torch.rand(n, generator=g) < 0.05] = IGNORE
    key_labels = torch.randint(0, 4, (m,), generator=g)
    key_groups = torch.randint(0, 2, (m,), generator=g)
    key_groups[torch.rand(m, generator=g) < 0.15] = SHARED
    q, k = torch.randn(n, d, generator=g), torch.randn(m, d, generator=g)
    case = dict(labels=labels, key_labels=key_labels, groups=groups, key_groups=key_groups, self_key_offset=None)
    run_and_compare(q, k, case, torch.float32, "each_positive")
    args = launches["forward_positive"][1]
    table = int_table(args, 7)[: chunk_count(args)]
    owns = table[:, 1] > table[:, 0]
    assert (owns & (table[:, 6] == 1)).any() and (owns & (table[:, 6] == 0)).any()
    assert (table[:, 5] > table[:, 4]).any()  # SHARED keys: a second range


def test_each_positive_pass_with_more_chunks_than_programs(launches):
    """Three-row groups make a chunk per group, more chunks than the positive pass's grid: every
    program takes several chunks in turn."""
    q, _, case = make_case("self", 130, None, 24, torch.float32, classes=2, seed=21)
    case["groups"] = torch.arange(130) // 3
    rows, _ = run_and_compare(q, None, case, torch.float32, "each_positive")
    (programs,), args = launches["forward_positive"]
    assert chunk_count(args) > 2 * programs and (rows[-30:] > 0).sum() > 5


def test_group_ids_are_relabelled_densely():
    """Group ids beyond int32 and SHARED rows on both sides: the kernels compare dense int32 ranks."""
    q, k, case = make_case("qk", 130, 257, 24, torch.float32, with_groups=True, ignore_frac=0.1, seed=11)
    case["groups"] = case["groups"] * (1 << 40) + 7
    case["key_groups"] = case["key_groups"] * (1 << 40) + 7
    case["groups"][::9] = SHARED
    case["key_groups"][::7] = SHARED
    run_and_compare(q, k, case, torch.float32, "each_positive")


@pytest.mark.parametrize("denominator", ["all", "each_positive", "negatives"])
def test_self_contrast_symmetric_backward_matches_two_kernels(denominator, launches):
    """Self-contrast runs one symmetric backward kernel; it equals dq + dk of the query/key kernels on
    a copy of the rows with self_key_offset = 0, with groups, SHARED rows, ignored rows and a tensor τ."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(130, 24, generator=g)
    labels = torch.randint(0, 4, (130,), generator=g)
    labels[::11] = IGNORE
    groups = torch.randint(0, 2, (130,), generator=g)
    groups[::13] = SHARED
    up = torch.rand(130, generator=g).to(DEVICE)
    results = []
    for self_contrast in (True, False):
        rows = x.to(DEVICE).requires_grad_(True)
        tau = torch.tensor(0.2, device=DEVICE, requires_grad=True)
        ids = dict(labels=labels.to(DEVICE), groups=groups.to(DEVICE))
        if self_contrast:
            loss = info_nce(rows, **ids, temperature=tau, denominator=denominator, reduction="none",
                            backend="triton")
        else:
            loss = info_nce(rows, rows * 1.0, **ids, key_labels=labels.clone().to(DEVICE),
                            key_groups=groups.clone().to(DEVICE), self_key_offset=0, temperature=tau,
                            denominator=denominator, reduction="none", backend="triton")
        results.append((loss.detach(), *torch.autograd.grad((loss * up).sum(), (rows, tau))))
        # the symmetric kernel ran for self-contrast only
        assert ("backward_symmetric" in launches) == self_contrast
        launches.clear()
    for got, want in zip(*results, strict=True):
        assert_close(got, want, 1e-5, "symmetric vs two kernels")


@pytest.mark.parametrize("mode", ["dq", "dk", "self"])
def test_fp16_gradients_do_not_flush_to_zero(mode):
    """At large N the per-element gradient g_i p_ij (g ~ 1/N from reduction="mean", p ~ 1/M) is far below
    fp16's smallest subnormal (6e-8); formed before the cast for the second product it flushed to zero
    (gradient errors of 4-50% here). The magnitudes are emulated with a small upstream gradient: the
    gradients themselves stay representable, only the per-element products are tiny."""
    g = torch.Generator().manual_seed(13)

    def clustered(n, norm):
        centroids = torch.nn.functional.normalize(torch.randn(4, 24, generator=g), dim=1)
        labels = torch.randint(0, 4, (n,), generator=g)
        return norm * (centroids[labels] + 0.5 * torch.randn(n, 24, generator=g) / 24**0.5), labels

    if mode == "self":
        q, labels = clustered(512, 1.0)
        k, kwargs = None, dict(labels=labels, temperature=0.1)
        upstream = torch.full((512,), 8e-6)
    else:
        # Unnormalised rows: tiny rows on the differentiated side keep the softmax flat (p ~ 1/M) while
        # large rows on the other side keep the gradient large.
        small, large = (64, 1e-3), (512, 30.0)
        (q, labels), (k, key_labels) = (clustered(*small), clustered(*large)) if mode == "dq" else (
            clustered(*large), clustered(*small))
        kwargs = dict(labels=labels, key_labels=key_labels, temperature=1.0, normalize=False)
        upstream = torch.full((q.shape[0],), 1e-5)
    grads = {}
    for dtype, backend in ((torch.float16, "triton"), (torch.float64, "reference")):
        qq = q.to(DEVICE, dtype).requires_grad_(mode != "dk")
        kk = None if k is None else k.to(DEVICE, dtype).requires_grad_(mode == "dk")
        ids = {name: t.to(DEVICE) if isinstance(t, torch.Tensor) else t for name, t in kwargs.items()}
        rows = info_nce(qq, kk, **ids, reduction="none", backend=backend)
        grads[backend] = torch.autograd.grad((rows * upstream.to(DEVICE, dtype)).sum(), kk if mode == "dk" else qq)[0]
    got, want = grads["triton"].double().cpu(), grads["reference"].double().cpu()
    error = ((got - want).abs().max() / want.abs().max()).item()
    assert error < 1e-2, f"fp16 gradient error {error:.3g} of its largest element"


@pytest.mark.parametrize("mode,denominator", [("self", "all"), ("self", "each_positive"), ("qk", "negatives"),
                                              ("qk", "each_positive")])
def test_every_tile_loop_runs(mode, denominator, launches):
    """Rows sorted by label leave tile pairs without positives and pairs of one label: every kernel
    runs its clean, positive and masked loops here, and the result still matches float64."""
    q, k, case = make_case(mode, 257 if mode == "self" else 130, 257, 24, torch.float32, classes=3,
                           ignore_frac=0.05, seed=14, with_groups=denominator == "each_positive")
    run_and_compare(q, k, case, torch.float32, denominator)
    kinds = {"forward", "backward_symmetric"} if mode == "self" else {"forward", "backward_query", "backward_key"}
    if denominator == "each_positive":
        kinds.add("forward_positive")
    assert set(launches) == kinds
    counts = {kind: int_table(args, 3).sum(0).tolist() for kind, (_, args) in launches.items()
              if kind != "forward_positive"}
    if denominator == "each_positive":  # chunks that own rows, key columns in their ranges
        args = launches["forward_positive"][1]
        table = int_table(args, 7)[: chunk_count(args)]  # the rows past the chunks are unwritten
        rows, columns = table[:, 1] - table[:, 0], table[:, 3] - table[:, 2] + table[:, 5] - table[:, 4]
        counts["forward_positive"] = [int((rows > 0).sum()), int(columns.sum())]
    assert all(min(count) > 0 for count in counts.values()), counts
