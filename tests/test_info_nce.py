"""info_nce: the dense reference against a naive loop, the chunked path against the reference."""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastkit import SHARED, info_nce

DENOMINATORS = ("all", "each_positive", "negatives")


def stable_seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def naive_info_nce(q, k, labels, key_labels, groups, key_groups, self_offset, tau, normalize, denominator,
                   weights, ignore_index, reduction):
    """The contract written as loops over anchors, positives and denominator terms."""
    q, k = q.double(), k.double()
    if normalize:
        q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)
        k = k / k.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n, m = q.shape[0], k.shape[0]
    per_row, contributing = [], []
    for i in range(n):
        s = [float(q[i] @ k[j]) / tau for j in range(m)]
        cand = [
            j for j in range(m)
            if key_labels[j] != ignore_index
            and (groups is None or groups[i] == key_groups[j] or SHARED in (groups[i], key_groups[j]))
            and (self_offset is None or j != i + self_offset)
        ]
        pos = [j for j in cand if key_labels[j] == labels[i]]
        neg = [j for j in cand if key_labels[j] != labels[i]]
        ok = labels[i] != ignore_index and pos and (denominator != "negatives" or neg)
        if not ok:
            per_row.append(0.0)
            contributing.append(False)
            continue
        total = 0.0
        for p in pos:
            if denominator == "all":
                terms = cand
            elif denominator == "each_positive":
                terms = [p] + neg
            else:
                terms = neg
            total += s[p] - math.log(sum(math.exp(s[a]) for a in terms))
        w = 1.0 if weights is None else float(weights[i])
        per_row.append(-w * total / len(pos))
        contributing.append(True)
    per_row = torch.tensor(per_row, dtype=torch.float64)
    if reduction == "none":
        return per_row
    if reduction == "sum":
        return per_row.sum()
    w = torch.ones(n, dtype=torch.float64) if weights is None else weights.double()
    denom = sum(float(w[i]) for i in range(n) if contributing[i])
    return per_row.sum() / denom if denom > 0 else torch.tensor(0.0, dtype=torch.float64)


def random_case(seed, n=9, m=11, d=5, classes=3, self_contrast=False, use_groups=False, ignore=False,
                use_weights=False, paired=False, shared=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=g, dtype=torch.float64)
    if self_contrast or paired:
        m = n
    k = None if self_contrast else torch.randn(m, d, generator=g, dtype=torch.float64)
    labels = None if paired else torch.randint(0, classes, (n,), generator=g)
    key_labels = None if (self_contrast or paired) else torch.randint(0, classes, (m,), generator=g)
    if ignore and labels is not None:
        labels[torch.rand(n, generator=g) < 0.25] = -1
        if key_labels is not None:
            key_labels[torch.rand(m, generator=g) < 0.25] = -1
    groups = key_groups = None
    if use_groups:
        groups = torch.randint(0, 2, (n,), generator=g)
        if not (self_contrast or paired):
            key_groups = torch.randint(0, 2, (m,), generator=g)
        if shared:  # about a third of the keys (and, where they have their own, queries) in every group
            target = groups if key_groups is None else key_groups
            target[torch.rand(target.shape[0], generator=g) < 0.35] = SHARED
            target[-1] = SHARED
            if key_groups is not None:
                groups[torch.rand(n, generator=g) < 0.2] = SHARED
    weights = torch.rand(n, generator=g, dtype=torch.float64) if use_weights else None
    return dict(query=q, key=k, labels=labels, key_labels=key_labels, groups=groups, key_groups=key_groups,
                weights=weights)


def naive_from_case(case, denominator, reduction, tau=0.1, normalize=True, ignore_index=-1):
    q, k = case["query"], case["key"]
    self_contrast = k is None
    n = q.shape[0]
    labels, key_labels = case["labels"], case["key_labels"]
    groups, key_groups = case["groups"], case["key_groups"]
    if self_contrast:
        k, key_labels, key_groups, offset = q, labels, groups, 0
    else:
        offset = None
        if labels is None:
            labels = key_labels = torch.arange(n)
            key_groups = groups if key_groups is None else key_groups
    return naive_info_nce(q, k, labels.tolist(), key_labels.tolist(),
                          None if groups is None else groups.tolist(),
                          None if key_groups is None else key_groups.tolist(),
                          offset, tau, normalize, denominator, case["weights"], ignore_index, reduction)


CASE_FLAGS = [
    dict(self_contrast=sc, use_groups=gr, ignore=ig, use_weights=w, paired=pa)
    for sc, gr, ig, w, pa in itertools.product([False, True], [False, True], [False, True], [False, True],
                                               [False, True])
    if not (sc and pa) and not (pa and ig)
]


@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("flags", CASE_FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "plain")
def test_reference_matches_naive_loop(denominator, flags):
    case = random_case(stable_seed(denominator, flags), **flags)
    for reduction in ("none", "sum", "mean"):
        got = info_nce(**case, denominator=denominator, reduction=reduction, backend="reference")
        want = naive_from_case(case, denominator, reduction)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize,temperature", [(False, 0.5), (True, 0.07)])
def test_reference_matches_naive_loop_without_normalisation(normalize, temperature):
    case = random_case(3, use_groups=True)
    for denominator in DENOMINATORS:
        got = info_nce(**case, denominator=denominator, temperature=temperature, normalize=normalize,
                       reduction="none", backend="reference")
        want = naive_from_case(case, denominator, "none", tau=temperature, normalize=normalize)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reference_self_key_offset_matches_naive_loop():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(6, 4, generator=g, dtype=torch.float64)
    extra = torch.randn(5, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 2, (6,), generator=g)
    extra_labels = torch.randint(0, 2, (5,), generator=g)
    keys = torch.cat([extra[:2], q, extra[2:]])
    key_labels = torch.cat([extra_labels[:2], labels, extra_labels[2:]])
    for denominator in DENOMINATORS:
        got = info_nce(q, keys, labels=labels, key_labels=key_labels, self_key_offset=2,
                       denominator=denominator, reduction="none", backend="reference")
        want = naive_info_nce(q, keys, labels.tolist(), key_labels.tolist(), None, None, 2, 0.1, True,
                              denominator, None, -1, "none")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _both_backends(case, chunk_size, **options):
    out = {}
    for backend in ("reference", "torch"):
        q = case["query"].clone().requires_grad_(True)
        k = None if case["key"] is None else case["key"].clone().requires_grad_(True)
        extra = {"chunk_size": chunk_size} if backend == "torch" else {}
        loss = info_nce(q, k, **{n: v for n, v in case.items() if n not in ("query", "key")}, backend=backend,
                        **extra, **options)
        grads = torch.autograd.grad(loss.sum(), [t for t in (q, k) if t is not None])
        out[backend] = (loss.detach(), grads)
    return out


@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("flags", CASE_FLAGS, ids=lambda f: "-".join(k for k, v in f.items() if v) or "plain")
def test_torch_path_matches_reference_values_and_gradients(denominator, flags):
    seed = stable_seed("torch", denominator, flags)
    g = torch.Generator().manual_seed(seed)
    n, m, d = (int(x) for x in torch.randint(1, 40, (3,), generator=g))
    if flags["paired"]:
        m = n
    chunk = int(torch.randint(1, n + 3, (1,), generator=g))
    case = random_case(seed, n=n, m=m, d=d, classes=4, **flags)
    for reduction in ("none", "mean"):
        out = _both_backends(case, chunk, denominator=denominator, reduction=reduction)
        torch.testing.assert_close(out["torch"][0], out["reference"][0], rtol=1e-9, atol=1e-11)
        for got, want in zip(out["torch"][1], out["reference"][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("self_contrast", [False, True])
def test_torch_path_gradcheck(denominator, self_contrast):
    case = random_case(11, n=7, m=9, d=3, classes=2, self_contrast=self_contrast, use_groups=True, ignore=True,
                       use_weights=True)
    q = case.pop("query").requires_grad_(True)
    k = case.pop("key")
    inputs = (q,) if k is None else (q, k.requires_grad_(True))

    def fn(*xs):
        return info_nce(xs[0], None if len(xs) == 1 else xs[1], **case, denominator=denominator,
                        backend="torch", chunk_size=3)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_torch_path_with_many_groups_computes_only_each_chunks_groups(denominator):
    # Per-image groups: each chunk sees a subset of the keys. Group 9 has queries but no keys,
    # and the keys include the queries (self_key_offset) so self-exclusion must follow the subset.
    g = torch.Generator().manual_seed(8)
    q = torch.randn(13, 6, generator=g, dtype=torch.float64)
    extra = torch.randn(7, 6, generator=g, dtype=torch.float64)
    keys = torch.cat([extra[:3], q, extra[3:]])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 9, 9])
    key_groups = torch.cat([torch.tensor([1, 2, 3]), groups, torch.tensor([0, 3, 4, 4])])
    labels = torch.randint(0, 3, (13,), generator=g)
    key_labels = torch.cat([torch.randint(0, 3, (3,), generator=g), labels, torch.randint(0, 3, (4,), generator=g)])
    key_groups[3 + 11:3 + 13] = 5  # the queries of group 9 are keys of another group
    options = dict(labels=labels, key_labels=key_labels, groups=groups, key_groups=key_groups,
                   self_key_offset=3, denominator=denominator, reduction="none")
    for chunk in (1, 2, 5):
        out = {}
        for backend in ("reference", "torch"):
            qq, kk = q.clone().requires_grad_(True), keys.clone().requires_grad_(True)
            extra_args = {"chunk_size": chunk} if backend == "torch" else {}
            loss = info_nce(qq, kk, backend=backend, **options, **extra_args)
            out[backend] = (loss, *torch.autograd.grad(loss.sum(), (qq, kk)))
        for got, want in zip(out["torch"], out["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert (out["torch"][0][11:] == 0).all()


@pytest.mark.parametrize("normalize", [False, True])
def test_torch_path_gradcheck_without_normalisation_and_zero_rows(normalize):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(5, 4, generator=g, dtype=torch.float64)
    q[1] = 0.0  # a zero embedding stays finite under normalisation
    k = torch.randn(6, 4, generator=g, dtype=torch.float64)
    labels, key_labels = torch.tensor([0, 1, 0, 2, 1]), torch.tensor([1, 0, 0, 2, 1, 2])
    if normalize:
        q[1] = 1e-3  # gradcheck needs a differentiable point: away from the eps clamp

    def fn(q, k):
        return info_nce(q, k, labels=labels, key_labels=key_labels, normalize=normalize, temperature=0.7,
                        backend="torch", chunk_size=2)

    assert torch.autograd.gradcheck(fn, (q.requires_grad_(True), k.requires_grad_(True)))


SHARED_FLAGS = [dict(flags, use_groups=True, shared=True) for flags in CASE_FLAGS if flags["use_groups"]]


def _flag_id(flags):
    return "-".join(k for k, v in flags.items() if v and k not in ("use_groups", "shared")) or "plain"


@pytest.mark.parametrize("denominator", DENOMINATORS)
@pytest.mark.parametrize("flags", SHARED_FLAGS, ids=_flag_id)
def test_shared_keys_match_naive_loop_and_torch_path(denominator, flags):
    # SHARED keys (and queries) are candidates of every group; awkward sizes, chunks that split groups.
    seed = stable_seed("shared", denominator, flags)
    g = torch.Generator().manual_seed(seed)
    n, m, d = (int(x) for x in torch.randint(2, 23, (3,), generator=g))
    case = random_case(seed, n=n, m=n if flags["paired"] else m, d=d, classes=3, **flags)
    if case["groups"] is not None:
        assert (case["groups"] == SHARED).any() or (case["key_groups"] is not None
                                                    and (case["key_groups"] == SHARED).any())
    for reduction in ("none", "mean"):
        got = info_nce(**case, denominator=denominator, reduction=reduction, backend="reference")
        torch.testing.assert_close(got, naive_from_case(case, denominator, reduction), rtol=1e-10, atol=1e-12)
        out = _both_backends(case, int(torch.randint(1, n + 2, (1,), generator=g)), denominator=denominator,
                             reduction=reduction)
        torch.testing.assert_close(out["torch"][0], out["reference"][0], rtol=1e-9, atol=1e-11)
        for got, want in zip(out["torch"][1], out["reference"][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_shared_group_is_not_a_group_of_its_own():
    # Two images, one shared key: without SHARED it would need a group id no query has.
    q = torch.randn(4, 3, dtype=torch.float64)
    keys = torch.cat([q, torch.randn(1, 3, dtype=torch.float64)])
    labels, key_labels = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 0])
    groups, key_groups = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1, SHARED])
    for backend in ("reference", "torch"):
        got = info_nce(q, keys, labels=labels, key_labels=key_labels, groups=groups, key_groups=key_groups,
                       self_key_offset=0, reduction="none", backend=backend)
        # only the shared key is a positive of the label-0 queries; each image's other row a negative
        for i in range(4):
            image = [j for j in range(4) if groups[j] == groups[i] and j != i] + [4]
            s = torch.stack([F.cosine_similarity(q[i], keys[j], dim=0) for j in image]) / 0.1
            want = 0.0 if labels[i] == 1 else float(torch.logsumexp(s, 0) - s[-1])
            assert float(got[i]) == pytest.approx(want, abs=1e-10), (backend, i)


# --- tensor temperature -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_tensor_temperature_equals_float_and_gradchecks(backend, denominator):
    case = random_case(stable_seed("tau", backend, denominator), n=7, m=9, d=4, classes=2, use_groups=True,
                       ignore=True, use_weights=True, shared=True)
    q, k = case.pop("query").requires_grad_(True), case.pop("key").requires_grad_(True)
    tau = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    extra = {"chunk_size": 3} if backend == "torch" else {}
    got = info_nce(q, k, **case, temperature=tau, denominator=denominator, backend=backend, **extra)
    want = info_nce(q, k, **case, temperature=0.3, denominator=denominator, backend=backend, **extra)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    def fn(q, k, tau):
        return info_nce(q, k, **case, temperature=tau, denominator=denominator, backend=backend, **extra)

    assert torch.autograd.gradcheck(fn, (q, k, tau))
    # tau alone (frozen embeddings, e.g. a probe): the torch path still computes its gradient
    assert torch.autograd.gradcheck(lambda tau: fn(q.detach(), k.detach(), tau), (tau,))


def test_tensor_temperature_gradient_matches_between_backends_in_self_contrast():
    case = random_case(21, n=30, d=6, classes=3, self_contrast=True, use_groups=True, shared=True)
    grads = {}
    for backend in ("reference", "torch"):
        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        loss = info_nce(**case, temperature=tau, backend=backend, **({"chunk_size": 7} if backend == "torch" else {}))
        (grads[backend],) = torch.autograd.grad(loss, tau)
    assert grads["reference"].abs() > 1e-3  # the loss does depend on tau here
    torch.testing.assert_close(grads["torch"], grads["reference"], rtol=1e-10, atol=1e-12)


def test_bad_tensor_temperature_is_rejected_like_a_number():
    q, lab = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    for bad in (torch.tensor(0.0), torch.tensor(-0.1), torch.tensor(float("nan")), torch.tensor(float("inf"))):
        _bad(ValueError, "temperature must be positive and finite", q, labels=lab, temperature=bad)
    _bad(ValueError, "0-dim", q, labels=lab, temperature=torch.tensor([0.1]))
    _bad(TypeError, "floating", q, labels=lab, temperature=torch.tensor(1))


def test_feature_map_input_equals_rows():
    g = torch.Generator().manual_seed(0)
    fq = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    fk = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (2, 3, 4), generator=g)
    rows = lambda f: f.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    for backend in ("reference", "torch"):
        got = info_nce(fq, fk, labels=labels, key_labels=labels, backend=backend, reduction="none")
        want = info_nce(rows(fq), rows(fk), labels=labels.flatten(), key_labels=labels.flatten(),
                        backend="reference", reduction="none")
        torch.testing.assert_close(got, want)


# --- properties -------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), denominator=st.sampled_from(DENOMINATORS),
       scale=st.floats(0.01, 100.0), backend=st.sampled_from(["reference", "torch"]))
def test_invariances(seed, denominator, scale, backend):
    case = random_case(seed, n=8, m=10, d=4, classes=3, use_groups=True, ignore=True)
    base = info_nce(**case, denominator=denominator, backend=backend, reduction="none")

    perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed))
    permuted = dict(case, key=case["key"][perm], key_labels=case["key_labels"][perm],
                    key_groups=case["key_groups"][perm])
    torch.testing.assert_close(info_nce(**permuted, denominator=denominator, backend=backend, reduction="none"),
                               base)

    relabel = torch.tensor([7, 2, 5])  # an injective map of the classes 0, 1, 2
    relabelled = dict(case)
    for name in ("labels", "key_labels"):
        lab = case[name]
        relabelled[name] = torch.where(lab >= 0, relabel[lab.clamp_min(0)], lab)
    torch.testing.assert_close(
        info_nce(**relabelled, denominator=denominator, backend=backend, reduction="none"), base)

    scaled = dict(case, query=case["query"] * scale, key=case["key"] * scale)
    torch.testing.assert_close(info_nce(**scaled, denominator=denominator, backend=backend, reduction="none"),
                               base)


# --- degenerate batches -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_degenerate_batches_give_zero_not_nan(backend, denominator):
    q = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    cases = {
        "no positives": dict(labels=torch.arange(6)),
        "all ignored": dict(labels=torch.full((6,), -1)),
        "single query": None,
    }
    for name, kwargs in cases.items():
        if kwargs is None:
            loss = info_nce(q[:1], labels=torch.tensor([0]), backend=backend, denominator=denominator)
        else:
            loss = info_nce(q, **kwargs, backend=backend, denominator=denominator)
        assert loss.item() == 0.0, name
        assert loss.requires_grad, name
        (grad,) = torch.autograd.grad(loss, q)
        assert torch.equal(grad, torch.zeros_like(grad)), name


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_one_class_batch(backend):
    q = torch.randn(5, 3, dtype=torch.float64)
    labels = torch.zeros(5, dtype=torch.long)
    # every other key is a positive: "negatives" has no denominator, so nothing contributes
    assert info_nce(q, labels=labels, denominator="negatives", backend=backend).item() == 0.0
    # "each_positive" with no negatives: each term is log(exp(s_p)) - s_p = 0
    assert info_nce(q, labels=labels, denominator="each_positive", backend=backend).abs().item() < 1e-12
    # "all": log-sum-exp over the four positives minus their mean, which is >= log 4 - spread
    loss = info_nce(q, labels=labels, denominator="all", backend=backend)
    want = naive_info_nce(q, q, labels.tolist(), labels.tolist(), None, None, 0, 0.1, True, "all", None, -1,
                          "mean")
    torch.testing.assert_close(loss, want)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_huge_logits_and_dead_rows_keep_gradients_finite(backend, denominator):
    # Unnormalised embeddings give logits far beyond float32's exp range; ignored queries and
    # rows without negatives must still get exactly zero, finite gradients.
    g = torch.Generator().manual_seed(4)
    q = (torch.randn(12, 8, generator=g) * 40).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, -1, -1, 3, 3, 3, 4])
    loss = info_nce(q, labels=labels, normalize=False, temperature=0.05, denominator=denominator,
                    backend=backend, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), q)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    want = info_nce(q.detach().double(), labels=labels, normalize=False, temperature=0.05,
                    denominator=denominator, backend="reference", reduction="none")
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-3)


def test_mean_with_zero_weights_is_zero():
    q = torch.randn(4, 3, requires_grad=True)
    loss = info_nce(q, labels=torch.tensor([0, 0, 1, 1]), weights=torch.zeros(4))
    assert loss.item() == 0.0 and loss.requires_grad


# --- mixed precision --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("denominator", DENOMINATORS)
def test_half_precision_is_close_to_float32(dtype, denominator):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(300, 64, generator=g) * 30  # large magnitudes: half inputs must not overflow
    labels = torch.randint(0, 4, (300,), generator=g)
    want = info_nce(q, labels=labels, denominator=denominator, backend="torch")
    half = q.to(dtype).requires_grad_(True)
    got = info_nce(half, labels=labels, denominator=denominator, backend="torch", chunk_size=64)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    (grad,) = torch.autograd.grad(got, half)
    assert grad.dtype == dtype and torch.isfinite(grad.float()).all()


# --- bad input --------------------------------------------------------------------------------------

def _bad(exc, match, *args, **kwargs):
    with pytest.raises(exc, match=match):
        info_nce(*args, **kwargs)


def test_bad_input_is_rejected_with_the_argument_named():
    q, k = torch.randn(4, 3), torch.randn(5, 3)
    lab, klab = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0, 1, 1])
    _bad(ValueError, "query", torch.randn(4), labels=lab)
    _bad(TypeError, "query", torch.ones(4, 3, dtype=torch.long), labels=lab)
    _bad(TypeError, "query", [[1.0]], labels=lab)
    _bad(ValueError, "embedding size", q, torch.randn(5, 2), labels=lab, key_labels=klab)
    _bad(TypeError, "dtype", q, k.double(), labels=lab, key_labels=klab)
    _bad(ValueError, "paired views", q, k)
    _bad(ValueError, "temperature", q, labels=lab, temperature=0.0)
    _bad(ValueError, "temperature", q, labels=lab, temperature=-1)
    _bad(ValueError, "temperature", q, labels=lab, temperature=float("nan"))
    _bad(TypeError, "temperature", q, labels=lab, temperature="0.1")
    _bad(ValueError, "NaN", torch.full((4, 3), float("nan")), labels=lab)
    _bad(ValueError, "NaN", q, torch.full((5, 3), float("inf")), labels=lab, key_labels=klab)
    _bad(ValueError, "labels", q, labels=torch.tensor([0, 1]))
    _bad(TypeError, "labels", q, labels=lab.float())
    _bad(ValueError, "labels", q, labels=torch.tensor([0, -3, 1, 1]))
    _bad(ValueError, "key_labels", q, k, labels=lab, key_labels=torch.tensor([0, 1]))
    _bad(ValueError, "key_labels is required", q, k, labels=lab)
    _bad(ValueError, "labels is required", q)
    _bad(ValueError, "groups", q, labels=lab, groups=torch.tensor([0, 1]))
    _bad(TypeError, "groups", q, labels=lab, groups=torch.zeros(4))
    _bad(ValueError, "key_groups", q, k, labels=lab, key_labels=klab, groups=torch.zeros(4, dtype=torch.long))
    _bad(ValueError, "groups must be non-negative group ids or SHARED", q, labels=lab,
         groups=torch.tensor([0, -2, 1, 1]))
    _bad(ValueError, "key_groups", q, k, labels=lab, key_labels=klab, groups=torch.zeros(4, dtype=torch.long),
         key_groups=torch.tensor([0, 0, -5, 1, 1]))
    _bad(ValueError, "denominator", q, labels=lab, denominator="some")
    _bad(ValueError, "reduction", q, labels=lab, reduction="avg")
    _bad(ValueError, "backend", q, labels=lab, backend="cuda")
    _bad(ValueError, "weights", q, labels=lab, weights=torch.ones(3))
    _bad(ValueError, "weights", q, labels=lab, weights=-torch.ones(4))
    _bad(ValueError, "chunk_size", q, labels=lab, backend="torch", chunk_size=0)
    _bad(ValueError, "self_key_offset", q, k, labels=lab, key_labels=klab, self_key_offset=2)
    _bad(ValueError, "at least one", torch.randn(0, 3), labels=torch.zeros(0, dtype=torch.long))


def test_triton_backend_without_kernels_or_gpu_raises_clearly():
    from contrastkit import kernels

    if kernels.available():
        pytest.skip("the Triton backend can run here")
    with pytest.raises(RuntimeError, match="triton"):
        info_nce(torch.randn(4, 3), labels=torch.tensor([0, 1, 0, 1]), backend="triton")


def test_a_remembered_call_plan_still_refuses_what_differs_from_it(monkeypatch):
    """The static checks are remembered per combination of what they read: a passing call is not
    re-checked, but any argument that differs in type, shape, dtype or setting is checked afresh and
    a failing call is never remembered (it raises every time, with the names of its own call)."""
    from contrastkit import _validation as v
    from contrastkit import core

    monkeypatch.setattr(core, "_PLANS", {})
    checked = []
    check_call = core._check_call
    monkeypatch.setattr(core, "_check_call", lambda *a: checked.append(a) or check_call(*a))
    q, lab = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    expected = info_nce(q, labels=lab, temperature=0.2)
    for _ in range(2):
        torch.testing.assert_close(info_nce(q.clone(), labels=lab.clone(), temperature=0.2), expected)
    assert len(checked) == 1
    refused = [
        (TypeError, "normalize", dict(labels=lab, temperature=0.2, normalize=1)),  # 1 == True, not a bool
        (TypeError, "labels", dict(labels=lab.float(), temperature=0.2)),
        (ValueError, "labels", dict(labels=lab[:4], temperature=0.2)),
        (ValueError, "temperature", dict(labels=lab, temperature=-0.2)),
        (ValueError, "reduction", dict(labels=lab, temperature=0.2, reduction="avg")),
        (ValueError, "groups", dict(labels=lab, temperature=0.2, groups=4)),
    ]
    for _ in range(2):
        for error, name, kwargs in refused:
            with pytest.raises(error, match=name):
                info_nce(q, **kwargs)
    assert len(checked) == 1 + 2 * len(refused)
    with pytest.raises(TypeError, match="query"):
        info_nce(q.long(), labels=lab)
    with v.embedding_names("anchors", "memory"), pytest.raises(ValueError, match="anchors"):
        info_nce(q[:, None, :], labels=lab, temperature=0.2)  # a failing call names its own arguments
    # A different but legal combination is checked once, then remembered too.
    info_nce(q.float(), labels=lab, temperature=0.2)
    info_nce(q.float(), labels=lab, temperature=0.2)
    assert len(checked) == 1 + 2 * len(refused) + 3
