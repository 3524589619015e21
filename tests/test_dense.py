"""The lean dense path against the float64 specification: values and gradients, at awkward sizes,
for block structure (int groups), paired views, id groups with SHARED keys and self-contrast."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastkit import SHARED, info_nce
from contrastkit._dense import block_count, dense_logits
from contrastkit._options import InfoNCEOptions

DENOMINATORS = ("all", "each_positive", "negatives")


def _leaves(case):
    return {k: v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) else v
            for k, v in case.items()}


def _agree(case, **options):
    """Value and gradient (query, key, tensor τ) of the dense path equal the reference's."""
    got_case, want_case = _leaves(case), _leaves(case)
    got = info_nce(**got_case, **options, backend="dense")
    want = info_nce(**want_case, **options, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    weights = torch.rand(got.shape, dtype=got.dtype)
    (got * weights).sum().backward()
    (want * weights).sum().backward()
    for name in ("query", "key", "temperature"):
        a, b = got_case.get(name), want_case.get(name)
        if isinstance(a, torch.Tensor) and a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12, msg=name)


def _rows(g, n, d=5, scale=1.0):
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).requires_grad_()


@settings(max_examples=60, deadline=None)
@given(blocks=st.integers(1, 4), per_query=st.integers(1, 5), per_key=st.integers(1, 6),
       classes=st.integers(1, 3), denominator=st.sampled_from(DENOMINATORS), normalize=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]), weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_int_groups_equal_the_reference(blocks, per_query, per_key, classes, denominator, normalize, reduction,
                                        weighted, seed):
    g = torch.Generator().manual_seed(seed)
    n, m = blocks * per_query, blocks * per_key
    case = dict(query=_rows(g, n), key=_rows(g, m, scale=2.0),
                labels=torch.randint(-1, classes, (n,), generator=g),
                key_labels=torch.randint(-1, classes, (m,), generator=g),
                temperature=torch.tensor(0.3, dtype=torch.float64).requires_grad_())
    if weighted:
        case["weights"] = torch.rand(n, generator=g, dtype=torch.float64)
    got = dict(case, groups=blocks)
    _agree(got, denominator=denominator, normalize=normalize, reduction=reduction)
    # The same blocks written as ids take the general path of every backend: equal values.
    ids = dict(case, groups=torch.arange(n) // per_query, key_groups=torch.arange(m) // per_key)
    torch.testing.assert_close(info_nce(**_leaves(got), denominator=denominator, normalize=normalize,
                                        reduction=reduction, backend="dense"),
                               info_nce(**_leaves(ids), denominator=denominator, normalize=normalize,
                                        reduction=reduction, backend="reference"))


@settings(max_examples=40, deadline=None)
@given(blocks=st.integers(1, 4), size=st.integers(1, 6), denominator=st.sampled_from(DENOMINATORS),
       seed=st.integers(0, 2**16), as_map=st.booleans())
def test_paired_views_in_blocks(blocks, size, denominator, seed, as_map):
    g = torch.Generator().manual_seed(seed)
    n = blocks * size
    query, key = _rows(g, n), _rows(g, n)
    if as_map:  # (B, C, h, w) maps of B images: the dense path reads them as blocks without a copy
        query = query.detach().reshape(blocks, size, 1, 5).permute(0, 3, 1, 2).requires_grad_()
    _agree(dict(query=query, key=key, groups=blocks), denominator=denominator, reduction="none")
    _agree(dict(query=query, key=key), denominator=denominator)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 9), extra=st.integers(0, 5), offset_at=st.integers(0, 5), classes=st.integers(1, 3),
       denominator=st.sampled_from(DENOMINATORS), seed=st.integers(0, 2**16))
def test_id_groups_shared_keys_and_self_offset(n, extra, offset_at, classes, denominator, seed):
    g = torch.Generator().manual_seed(seed)
    m = n + extra
    offset = min(offset_at, extra)
    query = _rows(g, n)
    key = torch.cat([_rows(g, offset), query.detach(), _rows(g, extra - offset)]).requires_grad_()
    labels = torch.randint(0, classes, (n,), generator=g)
    key_labels = torch.randint(-1, classes, (m,), generator=g)
    key_labels[offset:offset + n] = labels
    groups = torch.randint(0, 2, (n,), generator=g)
    key_groups = torch.randint(-1, 2, (m,), generator=g)  # -1 is SHARED: a candidate of every query
    assert SHARED == -1
    _agree(dict(query=query, key=key, labels=labels, key_labels=key_labels, groups=groups, key_groups=key_groups),
           denominator=denominator, self_key_offset=offset, reduction="none")


@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_self_contrast_in_blocks(denominator):
    g = torch.Generator().manual_seed(3)
    query = _rows(g, 12)
    _agree(dict(query=query, labels=torch.randint(-1, 3, (12,), generator=g), groups=3), denominator=denominator)
    _agree(dict(query=query, labels=torch.randint(-1, 3, (12,), generator=g)), denominator=denominator)


def test_gradcheck_through_blocks_and_temperature():
    g = torch.Generator().manual_seed(0)
    query, key = _rows(g, 6), _rows(g, 4)
    tau = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    labels, key_labels = torch.tensor([0, 1, 1, 0, 2, 2]), torch.tensor([0, 1, 2, 2])
    for denominator in DENOMINATORS:
        assert torch.autograd.gradcheck(
            lambda q, k, t, d=denominator: info_nce(q, k, labels=labels, key_labels=key_labels, groups=2,
                                                    temperature=t, denominator=d, backend="dense"),
            (query, key, tau))



@pytest.mark.parametrize("layout", ["maps", "rows", "map_and_rows"])
def test_paired_blocks_written_out_backward(layout):
    """Paired views in blocks take a fused function with its backward written out: value, first and
    second derivatives (query, key and tensor τ) against the reference, for maps (channels reduced
    in place), rows and one of each; a retained graph gives the same gradients twice."""
    g = torch.Generator().manual_seed(7)
    blocks, h, w, c = 3, 2, 3, 4
    maps = [torch.randn(blocks, c, h, w, generator=g, dtype=torch.float64) * 3 for _ in range(2)]
    rows = [m.permute(0, 2, 3, 1).reshape(-1, c) for m in maps]
    query, key = {"maps": maps, "rows": rows, "map_and_rows": (maps[0], rows[1])}[layout]
    query, key = query.clone().requires_grad_(), key.clone().requires_grad_()
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    for denominator in ("all", "each_positive"):
        _agree(dict(query=query, key=key, groups=blocks, temperature=tau), denominator=denominator,
               reduction="none")

    def loss(q, k, t):
        return info_nce(q, k, groups=blocks, temperature=t, backend="dense", reduction="none")
    assert torch.autograd.gradcheck(loss, (query, key, tau))
    assert torch.autograd.gradgradcheck(loss, (query, key, tau))
    with torch.no_grad():  # evaluation takes the same formula without the function
        torch.testing.assert_close(loss(query, key, tau), info_nce(query, key, groups=blocks, temperature=tau,
                                                                    backend="reference", reduction="none"))
    out = loss(query, key, tau).sum()
    first = torch.autograd.grad(out, (query, key, tau), retain_graph=True)
    second = torch.autograd.grad(out, (query, key, tau))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a detached key: the query's gradient alone, as the cross-level loss takes it
    want = torch.autograd.grad(info_nce(query, key.detach(), groups=blocks, temperature=tau,
                                        backend="reference"), query)[0]
    got = torch.autograd.grad(info_nce(query, key.detach(), groups=blocks, temperature=tau,
                                       backend="dense"), query)[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("keys_as", ["rows", "map"])
def test_map_queries_against_labelled_keys_in_blocks(denominator, keys_as):
    """A map's cells as queries against labelled keys per image (prototype mode's shape): the product
    is taken in the map's layout; value and gradients against the reference, and gradcheck."""
    g = torch.Generator().manual_seed(11)
    blocks, c, h, w, per_key = 3, 4, 3, 2, 4
    query = torch.randn(blocks, c, h, w, generator=g, dtype=torch.float64).requires_grad_()
    if keys_as == "rows":
        key = torch.randn(blocks * per_key, c, generator=g, dtype=torch.float64).requires_grad_()
    else:
        key = torch.randn(blocks, c, 2, 2, generator=g, dtype=torch.float64).requires_grad_()
    labels = torch.randint(-1, 3, (blocks * h * w,), generator=g)
    key_labels = torch.randint(-1, 3, (blocks * per_key,), generator=g)
    tau = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    case = dict(query=query, key=key, labels=labels, key_labels=key_labels, groups=blocks, temperature=tau)
    _agree(case, denominator=denominator, reduction="none")
    assert torch.autograd.gradcheck(
        lambda q, k, t: info_nce(q, k, labels=labels, key_labels=key_labels, groups=blocks, temperature=t,
                                 denominator=denominator, backend="dense"), (query, key, tau))

def test_half_inputs_accumulate_in_float32():
    g = torch.Generator().manual_seed(1)
    query = torch.randn(4, 25, 64, generator=g).to(torch.bfloat16)
    key = torch.randn(4, 25, 64, generator=g).to(torch.bfloat16)
    rows = dict(query=query.reshape(100, 64), key=key.reshape(100, 64), groups=4)
    got = info_nce(**rows, temperature=0.07, backend="dense")
    want = info_nce(**{k: v.double() if isinstance(v, torch.Tensor) else v for k, v in rows.items()},
                    temperature=0.07, backend="reference")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_nothing_contributes_gives_an_attached_zero():
    query = torch.randn(4, 3, requires_grad=True)
    loss = info_nce(query, torch.randn(4, 3), groups=4, denominator="negatives", backend="dense")  # 1 key a block
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(query.grad, torch.zeros_like(query))


def test_block_structure_is_used_only_where_it_holds():
    assert block_count(InfoNCEOptions(blocks=4), 8, 12) == 4
    assert block_count(InfoNCEOptions(blocks=4, self_key_offset=0), 8, 8) == 4
    assert block_count(InfoNCEOptions(blocks=4, self_key_offset=2), 8, 12) is None  # own key off the diagonal
    assert block_count(InfoNCEOptions(), 8, 12) is None
    assert dense_logits(8, 12, InfoNCEOptions(blocks=4)) == 2 * 3 * 4
    assert dense_logits(8, 12, InfoNCEOptions()) == 96


def test_int_groups_are_checked():
    x = torch.randn(8, 3)
    with pytest.raises(ValueError, match="divide N=8 and M=6"):
        info_nce(x, torch.randn(6, 3), labels=torch.zeros(8, dtype=torch.long),
                 key_labels=torch.zeros(6, dtype=torch.long), groups=4)
    with pytest.raises(ValueError, match=">= 1"):
        info_nce(x, x, groups=0)
    with pytest.raises(ValueError, match="key_groups must be None"):
        info_nce(x, x, groups=2, key_groups=torch.zeros(8, dtype=torch.long))


def test_paired_blocks_under_autocast_accumulate_in_float32():
    """bf16 autocast (CPU) does not reach the paired function's products: the loss is the float32
    value, and a half gradient from the loss's consumer is taken."""
    g = torch.Generator().manual_seed(5)
    query = torch.randn(4, 16, 3, 3, generator=g).requires_grad_()
    key = torch.randn(4, 16, 3, 3, generator=g)
    want = info_nce(query, key, groups=4, temperature=0.07, backend="dense", reduction="none")
    want_grad = torch.autograd.grad(want.sum(), query)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = info_nce(query, key, groups=4, temperature=0.07, backend="dense", reduction="none")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want)
    got_grad = torch.autograd.grad(got, query, torch.ones_like(got, dtype=torch.bfloat16))[0]
    torch.testing.assert_close(got_grad, want_grad)


@pytest.mark.parametrize("dim", [1, -1])
def test_norms_summed_narrow_match_wide_and_turn_overflow_into_nan(dim):
    """inverse_norm(wide=False) sums the squares in the rows' own dtype: the same scales as the float64
    sums for rows of norms 1e-20 to 1e18, NaN (never 0) exactly for rows whose squares overflow float32,
    and a gradient (float64, the differentiable branch) that gradcheck accepts."""
    from contrastkit._masks import inverse_norm

    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 7, 5, generator=g)
    row_shape = (3, 1, 5) if dim == 1 else (3, 7, 1)
    exponents = torch.empty(row_shape).uniform_(-20, 18, generator=g)
    too_long = torch.rand(row_shape, generator=g) < 0.3
    exponents = torch.where(too_long, torch.empty(row_shape).uniform_(21, 37, generator=g), exponents)
    x = x * 10.0 ** exponents
    assert torch.isfinite(x).all()
    wide, narrow = inverse_norm(x, dim), inverse_norm(x, dim, wide=False)
    overflow = (x.double().square().sum(dim=dim, keepdim=True) > torch.finfo(torch.float32).max)
    assert overflow.any() and (~overflow).any()
    assert torch.equal(narrow.isnan(), overflow)
    torch.testing.assert_close(narrow[~overflow], wide[~overflow], rtol=2e-6, atol=0)
    x64 = torch.randn(2, 4, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: inverse_norm(t, dim, wide=False), (x64,))
    torch.testing.assert_close(inverse_norm(x64, dim, wide=False), inverse_norm(x64, dim))


@pytest.mark.parametrize("layout", ["maps", "rows"])
def test_a_screened_call_sums_norms_narrow_and_recomputes_rows_too_long_for_them(monkeypatch, layout):
    """With value checks on, paired blocks sum their norms in float32 and test the loss; a finite row
    whose squares overflow float32 makes that loss NaN and the call is computed again with float64
    sums: value and gradient equal the float64 reference. With checks off the sums are float64 at once."""
    from contrastkit import _dense, value_checks

    widths = []
    original = _dense.inverse_norm
    monkeypatch.setattr(_dense, "inverse_norm",
                        lambda x, dim=-1, wide=True: widths.append(wide) or original(x, dim, wide))
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(4, 6, 3, 3, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    if layout == "rows":
        q, k = (x.permute(0, 2, 3, 1).reshape(-1, 6) for x in (q, k))

    def loss_and_grad(query, key, **kwargs):
        leaf = query.detach().clone().requires_grad_()
        loss = info_nce(leaf, key, groups=4, temperature=0.1, **kwargs)
        loss.backward()
        return loss.detach(), leaf.grad

    def agrees(query, key):
        got = loss_and_grad(query, key)
        want = loss_and_grad(query.double(), key.double(), backend="reference")
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-6)

    with value_checks(True):
        agrees(q, k)
        assert widths == [False, False]
        q_long = q.clone()
        (q_long[2, :, 1, 0] if layout == "maps" else q_long[13]).mul_(1e30)
        widths.clear()
        agrees(q_long, k)
        assert widths == [False, False, True, True]
    widths.clear()
    with value_checks(False):
        agrees(q_long, k)
    assert widths == [True, True]
