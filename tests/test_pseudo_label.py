"""PseudoLabelContrast against independent float64 formulas, plus the label helpers."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import contrastkit as ck
from contrastkit.pseudo_label import sample_anchors

TAU = 0.1


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _usable(labels, confidence, threshold, include_background, ignore_index):
    usable = labels != ignore_index
    if not include_background:
        usable &= labels != 0
    if confidence is not None and threshold is not None:
        usable &= confidence >= threshold
    return usable


def prototype_formula(emb, labels, pair_index=None, confidence=None, threshold=None, tau=TAU,
                      include_background=False, ignore_index=-1, anchor_mask=None):
    """The issue's formula, written out pixel by pixel in float64."""
    emb = emb.double()
    batch, _, height, width = emb.shape
    usable = _usable(labels, confidence, threshold, include_background, ignore_index)
    pair = list(range(batch)) if pair_index is None else pair_index.tolist()
    means = []
    for b in range(batch):
        classes = sorted({int(c) for c in labels[b][usable[b]].tolist()})
        means.append({c: emb[b][:, (labels[b] == c) & usable[b]].mean(dim=1) for c in classes})
    total, weight_sum = emb.new_zeros(()), 0.0
    for a in range(batch):
        sources = [a] if pair[a] == a else [a, pair[a]]
        prototypes = [(c, mu) for x in sources for c, mu in means[x].items()]
        for y in range(height):
            for x in range(width):
                if not usable[a, y, x] or (anchor_mask is not None and not anchor_mask[a, y, x]):
                    continue
                z, c = emb[a, :, y, x], int(labels[a, y, x])
                sims = [(k, F.cosine_similarity(z, mu, dim=0) / tau) for k, mu in prototypes]
                lse = torch.logsumexp(torch.stack([s for _, s in sims]), dim=0)
                positives = [s for k, s in sims if k == c]
                loss = -sum(s - lse for s in positives) / len(positives)
                w = 1.0 if confidence is None else float(confidence[a, y, x])
                total = total + w * loss
                weight_sum += w
    return total / weight_sum if weight_sum > 0 else total


def pixel_formula(emb, labels, confidence=None, threshold=None, tau=TAU, include_background=False,
                  ignore_index=-1):
    """Supervised contrast over all usable pixels of the batch, one anchor at a time, float64."""
    rows = emb.double().permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    usable = _usable(labels, confidence, threshold, include_background, ignore_index).reshape(-1)
    flat = labels.reshape(-1)
    weights = None if confidence is None else confidence.reshape(-1)
    total, weight_sum = rows.new_zeros(()), 0.0
    for i in range(rows.shape[0]):
        if not usable[i]:
            continue
        others = [j for j in range(rows.shape[0]) if j != i and usable[j]]
        positives = [j for j in others if flat[j] == flat[i]]
        if not positives:
            continue
        sims = {j: F.cosine_similarity(rows[i], rows[j], dim=0) / tau for j in others}
        lse = torch.logsumexp(torch.stack(list(sims.values())), dim=0)
        loss = -sum(sims[j] - lse for j in positives) / len(positives)
        w = 1.0 if weights is None else float(weights[i])
        total = total + w * loss
        weight_sum += w
    return total / weight_sum if weight_sum > 0 else total


def _batch(seed, batch=3, dim=4, size=5, num_classes=3, dtype=torch.float64):
    g = _gen(seed)
    emb = torch.randn(batch, dim, size, size, generator=g, dtype=dtype)
    labels = torch.randint(0, num_classes, (batch, size, size), generator=g)
    confidence = torch.rand(batch, size, size, generator=g, dtype=dtype)
    return emb, labels, confidence


# ---------------------------------------------------------------- prototype mode


@pytest.mark.parametrize("num_classes", [2, 3, 4])
@pytest.mark.parametrize("paired", [False, True])
@pytest.mark.parametrize("include_background", [False, True])
def test_prototype_matches_formula(num_classes, paired, include_background):
    emb, labels, _ = _batch(num_classes, batch=4, num_classes=num_classes)
    pair_index = torch.tensor([1, 0, 3, 2]) if paired else None
    got = ck.pseudo_label_contrast(emb, labels, pair_index=pair_index, include_background=include_background)
    want = prototype_formula(emb, labels, pair_index, include_background=include_background)
    torch.testing.assert_close(got, want)
    assert got.dtype == torch.float64


def test_prototype_asymmetric_pairing_and_confidence_weighting():
    emb, labels, confidence = _batch(7, batch=3, num_classes=4)
    pair_index = torch.tensor([2, 2, 0])  # image 1 borrows image 2's means; image 2 is not paired back
    got = ck.pseudo_label_contrast(emb, labels, confidence, pair_index, confidence_threshold=0.3)
    want = prototype_formula(emb, labels, pair_index, confidence, threshold=0.3)
    torch.testing.assert_close(got, want)
    # Weighting matters: the unweighted loss differs.
    unweighted = prototype_formula(emb, labels, pair_index, confidence=None)
    assert not torch.allclose(got, unweighted)


def test_prototype_sampled_anchors_match_formula_on_the_drawn_pixels():
    emb, labels, _ = _batch(3, batch=4, size=6, num_classes=3)
    pair_index = torch.tensor([1, 0, 3, 2])
    got = ck.pseudo_label_contrast(emb, labels, pair_index=pair_index, anchors_per_class=4,
                                   generator=_gen(11))
    drawn = sample_anchors(labels, labels != 0, 4, _gen(11))
    want = prototype_formula(emb, labels, pair_index, anchor_mask=drawn)
    torch.testing.assert_close(got, want)
    # The means still use every pixel, so this is not the loss of the drawn pixels alone.
    all_pixels = prototype_formula(emb, labels, pair_index)
    assert not torch.allclose(got, all_pixels)


def test_prototype_gradients_match_formula():
    emb, labels, confidence = _batch(5, batch=2, size=4, num_classes=3)
    pair_index = torch.tensor([1, 0])
    a = emb.clone().requires_grad_()
    b = emb.clone().requires_grad_()
    ck.pseudo_label_contrast(a, labels, confidence, pair_index).backward()
    prototype_formula(b, labels, pair_index, confidence).backward()
    torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
def test_gradcheck(mode):
    emb, labels, confidence = _batch(9, batch=2, dim=3, size=3, num_classes=3)
    emb.requires_grad_()
    pair_index = torch.tensor([1, 0]) if mode == "prototype" else None

    def loss(e):
        return ck.pseudo_label_contrast(e, labels, confidence, pair_index, mode=mode)

    assert torch.autograd.gradcheck(loss, (emb,))


# ---------------------------------------------------------------- pixel mode


@pytest.mark.parametrize("include_background", [False, True])
def test_pixel_matches_naive_loop_and_reference(include_background):
    emb, labels, confidence = _batch(4, batch=2, size=4, num_classes=3)
    labels[0, 0, :2] = -1
    got = ck.pseudo_label_contrast(emb, labels, confidence, mode="pixel", confidence_threshold=0.2,
                                   include_background=include_background)
    want = pixel_formula(emb, labels, confidence, 0.2, include_background=include_background)
    torch.testing.assert_close(got, want)
    usable = _usable(labels, confidence, 0.2, include_background, -1)
    reference = ck.info_nce(emb, labels=torch.where(usable, labels, -1).reshape(-1),
                            weights=confidence.reshape(-1), backend="reference")
    torch.testing.assert_close(got, reference)


def test_pixel_sampled_anchors_contrast_the_drawn_pixels():
    emb, labels, _ = _batch(6, batch=2, size=6, num_classes=3)
    got = ck.pseudo_label_contrast(emb, labels, mode="pixel", anchors_per_class=3, generator=_gen(2))
    drawn = sample_anchors(labels, labels != 0, 3, _gen(2)).reshape(-1)
    rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])[drawn]
    want = ck.info_nce(rows, labels=labels.reshape(-1)[drawn], backend="reference")
    torch.testing.assert_close(got, want)


def test_half_precision_accumulates_in_float32():
    emb, labels, confidence = _batch(8, batch=2, size=8, num_classes=3, dtype=torch.float32)
    for mode in ("prototype", "pixel"):
        full = ck.pseudo_label_contrast(emb, labels, confidence, mode=mode)
        half = ck.pseudo_label_contrast(emb.bfloat16(), labels, confidence, mode=mode)
        assert half.dtype == torch.float32 and torch.isfinite(half)
        torch.testing.assert_close(half, full, atol=0.1, rtol=0.02)


def test_module_equals_functional_and_repr():
    emb, labels, confidence = _batch(1, num_classes=3)
    module = ck.PseudoLabelContrast(temperature=0.2, anchors_per_class=2, confidence_threshold=0.1)
    got = module(emb, labels, confidence, generator=_gen(0))
    want = ck.pseudo_label_contrast(emb, labels, confidence, temperature=0.2, anchors_per_class=2,
                                    confidence_threshold=0.1, generator=_gen(0))
    torch.testing.assert_close(got, want)
    assert "anchors_per_class=2" in repr(module)


# ---------------------------------------------------------------- resolution and sampling


def test_labels_at_a_finer_resolution_are_sampled_to_the_embeddings():
    emb, _, _ = _batch(2, size=4)
    g = _gen(3)
    fine = torch.randint(0, 3, (3, 8, 8), generator=g)
    confidence = torch.rand(3, 8, 8, generator=g, dtype=torch.float64)
    coarse, coarse_conf = fine[:, ::2, ::2], confidence[:, ::2, ::2]  # floor(i * 8 / 4) = 2i
    for mode in ("prototype", "pixel"):
        got = ck.pseudo_label_contrast(emb, fine, confidence, mode=mode)
        want = ck.pseudo_label_contrast(emb, coarse, coarse_conf, mode=mode)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("size", [(3, 5), (8, 8), (7, 2), 13])
def test_downsample_labels_is_torch_nearest(size):
    labels = torch.randint(-1, 4, (2, 9, 6), generator=_gen(0)).to(torch.int16)
    got = ck.downsample_labels(labels, size)
    out = (size, size) if isinstance(size, int) else size
    want = F.interpolate(labels[:, None].double(), size=out, mode="nearest")[:, 0].to(torch.int16)
    assert got.dtype == torch.int16 and got.shape == (2, *out)
    assert torch.equal(got, want)


def test_downsample_labels_errors():
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        ck.downsample_labels(torch.zeros(1, 4, 4), 2)
    with pytest.raises(ValueError, match=r"labels must be \(B, h, w\) or \(B, 1, h, w\)"):
        ck.downsample_labels(torch.zeros(4, 4, dtype=torch.long), 2)
    with pytest.raises(TypeError, match="size"):
        ck.downsample_labels(torch.zeros(1, 4, 4, dtype=torch.long), 2.5)
    with pytest.raises(ValueError, match="size must be positive"):
        ck.downsample_labels(torch.zeros(1, 4, 4, dtype=torch.long), (0, 2))


def test_sample_anchors_draws_min_k_per_image_and_class_uniformly():
    labels = torch.randint(0, 4, (3, 6, 6), generator=_gen(5))
    usable = labels != 0
    mask = sample_anchors(labels, usable, 3, _gen(1))
    assert not (mask & ~usable).any()
    for b in range(3):
        for c in range(1, 4):
            count = int(((labels[b] == c) & usable[b]).sum())
            assert int((mask[b] & (labels[b] == c)).sum()) == min(3, count)
    assert torch.equal(mask, sample_anchors(labels, usable, 3, _gen(1)))
    assert not torch.equal(mask, sample_anchors(labels, usable, 3, _gen(2)))
    # Each of 6 pixels is drawn with probability 2/6.
    one_class = torch.zeros(1, 1, 6, dtype=torch.long) + 1
    g = _gen(0)
    hits = sum(sample_anchors(one_class, one_class > 0, 2, g).double() for _ in range(600))
    assert torch.all((hits - 200).abs() < 50), hits


# ---------------------------------------------------------------- pseudo_labels


def test_pseudo_labels_softmax_and_threshold():
    logits = torch.randn(2, 4, 3, 5, generator=_gen(0), requires_grad=True)
    labels, confidence = ck.pseudo_labels(logits, threshold=0.4, ignore_index=255)
    p = torch.softmax(logits.detach(), dim=1)
    torch.testing.assert_close(confidence, p.max(dim=1).values)
    expected = torch.where(p.max(dim=1).values >= 0.4, p.argmax(dim=1), 255)
    assert torch.equal(labels, expected) and labels.dtype == torch.int64
    assert (labels == 255).any() and (labels != 255).any()
    assert not confidence.requires_grad


def test_pseudo_labels_sigmoid_binary():
    logits = torch.tensor([[[[2.0, -1.0, 0.1]]]], dtype=torch.float64)
    labels, confidence = ck.pseudo_labels(logits, threshold=0.6)
    p = torch.sigmoid(logits[:, 0])
    torch.testing.assert_close(confidence, torch.maximum(p, 1 - p))
    assert labels.tolist() == [[[1, 0, -1]]]


def test_pseudo_labels_errors():
    with pytest.raises(TypeError, match="floating"):
        ck.pseudo_labels(torch.zeros(1, 2, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index=1 is a class id"):
        ck.pseudo_labels(torch.zeros(1, 3, 2, 2), ignore_index=1)
    with pytest.raises(ValueError, match="threshold"):
        ck.pseudo_labels(torch.zeros(1, 3, 2, 2), threshold=1.5)
    with pytest.raises(ValueError, match="NaN"):
        ck.pseudo_labels(torch.full((1, 3, 2, 2), float("nan")))


# ---------------------------------------------------------------- degenerate batches


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
def test_everything_ignored_gives_attached_zero(mode):
    emb = torch.randn(2, 3, 4, 4, requires_grad=True)
    for labels in (torch.full((2, 4, 4), -1), torch.zeros(2, 4, 4, dtype=torch.long)):  # ignored, background
        loss = ck.pseudo_label_contrast(emb, labels, mode=mode)
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(emb.grad, torch.zeros_like(emb))
    conf = torch.full((2, 4, 4), 0.1)
    assert ck.pseudo_label_contrast(emb, torch.ones(2, 4, 4, dtype=torch.long), conf, mode=mode,
                                    confidence_threshold=0.5).item() == 0.0


def test_single_class_images_and_absent_classes():
    emb, labels, _ = _batch(12, batch=3, size=4, num_classes=3)
    labels[0] = 1          # a single foreground class: its anchors have loss exactly 0
    labels[1, :, :2] = 0   # class absent from half of image 1 is fine; class 2 removed below
    labels[1][labels[1] == 2] = 1
    single = ck.pseudo_label_contrast(emb[:1], labels[:1])
    assert single.item() == 0.0
    for pair_index in (None, torch.tensor([1, 2, 0])):
        got = ck.pseudo_label_contrast(emb, labels, pair_index=pair_index)
        assert torch.isfinite(got)
        torch.testing.assert_close(got, prototype_formula(emb, labels, pair_index))


def test_pixel_mode_without_positives_is_zero():
    emb = torch.randn(1, 3, 1, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[1, 2, 3]]])  # every pixel alone in its class
    loss = ck.pseudo_label_contrast(emb, labels, mode="pixel")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(emb.grad).all()


# ---------------------------------------------------------------- bad input


def test_bad_input_errors():
    emb, labels, confidence = _batch(0, batch=2, num_classes=3)
    f = ck.pseudo_label_contrast
    with pytest.raises(ValueError, match=r"labels must be class ids in \[0, 3\)"):
        f(emb, labels + 1, num_classes=3)
    with pytest.raises(ValueError, match="labels must be non-negative class ids"):
        f(emb, labels - 2)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        f(emb, labels.double())
    with pytest.raises(TypeError, match="embeddings must have a floating dtype"):
        f(emb.long(), labels)
    with pytest.raises(ValueError, match="embeddings must be a non-empty"):
        f(emb[0], labels)
    with pytest.raises(ValueError, match=r"labels must be \(B, h, w\) with B=2"):
        f(emb, labels[:1])
    with pytest.raises(ValueError, match="confidence must have the shape of labels"):
        f(emb, labels, confidence[:, :2])
    with pytest.raises(TypeError, match="confidence must be a floating"):
        f(emb, labels, (confidence > 0.5).long())
    with pytest.raises(ValueError, match=r"confidence must lie in \[0, 1\]"):
        f(emb, labels, confidence + 1)
    with pytest.raises(ValueError, match="pair_index must be"):
        f(emb, labels, pair_index=torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="pair_index values"):
        f(emb, labels, pair_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="pair_index applies to mode='prototype' only"):
        f(emb, labels, pair_index=torch.tensor([1, 0]), mode="pixel")
    with pytest.raises(ValueError, match="NaN"):
        f(emb * math.nan, labels)
    with pytest.raises(TypeError, match="generator"):
        f(emb, labels, generator=0)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"temperature": 0.0}, ValueError, "temperature"),
    ({"mode": "pixels"}, ValueError, "mode must be one of"),
    ({"anchors_per_class": 0}, ValueError, "anchors_per_class"),
    ({"include_background": 1}, TypeError, "include_background"),
    ({"confidence_threshold": 1.5}, ValueError, "confidence_threshold"),
    ({"num_classes": 0}, ValueError, "num_classes"),
    ({"num_classes": 4, "ignore_index": 2}, ValueError, "ignore_index=2 is a class id"),
])
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        ck.PseudoLabelContrast(**kwargs)


# ---------------------------------------------------------------- memory


_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, torch, contrastkit as ck
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(8, 32, 64, 64, generator=g, requires_grad=True)
    labels = torch.randint(0, 4, (8, 64, 64), generator=g)
    loss = ck.pseudo_label_contrast(emb, labels, mode="pixel", include_background=True)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(emb.grad).all()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
""")


@pytest.mark.slow
def test_pixel_mode_all_anchors_runs_in_bounded_memory():
    n, bound = 8 * 64 * 64, 1.5 * 2**30
    assert n == 32_768 and n * n * 4 > 2 * bound  # the dense float32 logits alone: 4 GiB
    result = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True,
                            timeout=600, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split()[-1])
    assert peak < bound, f"peak RSS {peak / 2**30:.2f} GiB"


def test_pixel_mode_gives_only_usable_pixels_to_the_core_op(monkeypatch):
    # Cost is quadratic in the core op's rows: background and ignored pixels must not reach it.
    emb, labels, confidence = _batch(0, batch=2, size=6)
    labels[0, :2] = -1
    seen = []
    core = ck.pseudo_label.info_nce

    def spy(query, *args, **kwargs):
        seen.append(query.shape)
        return core(query, *args, **kwargs)

    monkeypatch.setattr(ck.pseudo_label, "info_nce", spy)
    got = ck.pseudo_label_contrast(emb, labels, confidence, mode="pixel", confidence_threshold=0.2)
    usable = (labels > 0) & (confidence >= 0.2)
    assert seen == [torch.Size([int(usable.sum()), 4])] and int(usable.sum()) < labels.numel() // 2
    torch.testing.assert_close(got, pixel_formula(emb, labels, confidence, 0.2).to(got.dtype))


# ---------------------------------------------------------------- sync-free pixel anchors


@pytest.mark.parametrize("include_background", [False, True])
def test_pixel_anchor_slots_contrast_the_same_draw(include_background):
    # With num_classes the drawn anchors sit in fixed slots (no host sync); the loss is the one
    # of the same draw gathered by count, and equals the reference on the drawn pixels.
    emb, labels, confidence = _batch(12, batch=3, size=6, num_classes=4)
    labels[1] = 0  # an image with background only: all its foreground slots stay empty
    labels[0, 0, :3] = -1
    options = dict(mode="pixel", anchors_per_class=5, include_background=include_background)
    slotted = ck.pseudo_label_contrast(emb, labels, confidence, num_classes=4, generator=_gen(4), **options)
    counted = ck.pseudo_label_contrast(emb, labels, confidence, generator=_gen(4), **options)
    torch.testing.assert_close(slotted, counted)
    usable = (labels != -1) & ((labels != 0) | include_background)
    drawn = sample_anchors(labels, usable, 5, _gen(4)).reshape(-1)
    rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])[drawn]
    want = ck.info_nce(rows, labels=labels.reshape(-1)[drawn], weights=confidence.reshape(-1)[drawn],
                       backend="reference")
    torch.testing.assert_close(slotted, want)
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    ck.pseudo_label_contrast(a, labels, confidence, num_classes=4, generator=_gen(4), **options).backward()
    ck.pseudo_label_contrast(b, labels, confidence, generator=_gen(4), **options).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_pixel_mode_without_any_usable_pixel_is_an_attached_zero():
    emb, labels, _ = _batch(2, batch=2, size=4, num_classes=3)
    emb.requires_grad_()
    for extra in (dict(), dict(anchors_per_class=3), dict(anchors_per_class=3, num_classes=3)):
        loss = ck.pseudo_label_contrast(emb, torch.zeros_like(labels), mode="pixel", **extra)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert torch.equal(emb.grad, torch.zeros_like(emb))
        emb.grad = None


def test_value_checks_follow_the_switch():
    emb, labels, _ = _batch(3, batch=2, size=4, num_classes=3)
    emb[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        ck.pseudo_label_contrast(emb, labels)
    with ck.value_checks(False):
        ck.pseudo_label_contrast(emb, labels)  # unchecked: the NaN goes through, no sync spent on it
    big = torch.full((2, 3, 4, 4), 1e37)  # finite, but its sum overflows: the screen must not raise
    ck.pseudo_label_contrast(big, labels)


def test_prototype_without_num_classes_refuses_a_huge_label_id():
    emb, labels, _ = _batch(1, batch=2, size=4, num_classes=3)
    labels[1, 2, 3] = 10**12
    with pytest.raises(ValueError, match="num_classes"):
        ck.pseudo_label_contrast(emb, labels)
    labels[1, 2, 3] = 4095  # the largest id it still sizes by itself
    assert torch.isfinite(ck.pseudo_label_contrast(emb, labels))


# ---------------------------------------------------------------- binary labels (issue 24)


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
@pytest.mark.parametrize("num_classes", [None, 2])
def test_binary_labels_contrast_foreground_against_background_by_default(mode, num_classes):
    emb, labels, confidence = _batch(21, batch=3, size=4, num_classes=2)
    emb.requires_grad_()
    got = ck.PseudoLabelContrast(mode=mode, num_classes=num_classes)(emb, labels, confidence)
    formula = prototype_formula if mode == "prototype" else pixel_formula
    want = formula(emb, labels, confidence=confidence, include_background=True)
    torch.testing.assert_close(got, want)
    assert got.item() > 0.1  # foreground-only binary contrast was exactly 0
    (grad,) = torch.autograd.grad(got, emb)
    torch.testing.assert_close(grad, torch.autograd.grad(want, emb)[0])
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
def test_multi_class_default_stays_foreground_only(mode):
    emb, labels, _ = _batch(22, batch=2, size=4, num_classes=3)
    formula = prototype_formula if mode == "prototype" else pixel_formula
    for num_classes in (None, 3):
        got = ck.pseudo_label_contrast(emb, labels, mode=mode, num_classes=num_classes)
        torch.testing.assert_close(got, formula(emb, labels, include_background=False))


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
def test_foreground_only_binary_labels_warn_once_naming_the_option(mode, monkeypatch):
    import warnings

    import contrastkit.pseudo_label as pl

    monkeypatch.setattr(pl, "_warned_foreground_only", False)
    emb, labels, _ = _batch(23, batch=2, size=4, num_classes=2)
    loss = ck.PseudoLabelContrast(mode=mode, include_background=False)
    with pytest.warns(UserWarning, match=r"include_background=False .* pass include_background=True"):
        first = loss(emb, labels)
    if mode == "prototype":
        assert first.item() == 0.0  # what the warning is about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(emb, labels)  # once per process
        monkeypatch.setattr(pl, "_warned_foreground_only", False)
        ck.PseudoLabelContrast(mode=mode)(emb, labels)  # the default includes the background
        ck.pseudo_label_contrast(emb, labels.clamp_max(0), mode=mode, include_background=False)  # nothing to fix
        ck.pseudo_label_contrast(emb, labels * 2, mode=mode, include_background=False, num_classes=3)
        if mode == "pixel":
            with ck.value_checks(False):  # the values are not read where a read would be a host sync
                ck.pseudo_label_contrast(emb, labels, mode=mode, include_background=False)
    with pytest.warns(UserWarning, match="include_background=True"):  # num_classes=2 says so without reading
        ck.pseudo_label_contrast(emb, labels, mode=mode, include_background=False, num_classes=2)


# ---------------------------------------------------------------- label layouts and tensor subclasses


class _Tagged(torch.Tensor):
    """A tensor subclass with a __torch_function__ of its own, as MONAI's MetaTensor has."""


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
def test_labels_with_a_channel_axis_or_one_hot_give_the_index_result(mode):
    emb, labels, confidence = _batch(24, batch=2, size=6, num_classes=3)
    labels[0, 0, :3] = -1
    kw = dict(mode=mode, num_classes=3, anchors_per_class=4, confidence_threshold=0.2)
    want = ck.pseudo_label_contrast(emb, labels, confidence, generator=_gen(5), **kw)
    one_hot = F.one_hot(labels.clamp_min(0), 3).permute(0, 3, 1, 2)
    one_hot[0, :, 0, :3] = 0  # unlabelled pixels: no channel set
    for layout, conf, fmt in ((labels[:, None], confidence, "index"), (labels, confidence[:, None], "index"),
                              (one_hot, confidence, "one_hot"), (one_hot.float(), confidence, "one_hot"),
                              (one_hot.bool(), confidence, "one_hot")):
        got = ck.pseudo_label_contrast(emb, layout, conf, generator=_gen(5), labels_format=fmt, **kw)
        assert torch.equal(got, want), (layout.shape, layout.dtype, fmt)
    # one-hot fixes K by its shape: without num_classes, prototype mode reads nothing from the values
    kw.pop("num_classes")
    module = ck.PseudoLabelContrast(mode=mode, labels_format="one_hot", anchors_per_class=4, confidence_threshold=0.2)
    assert torch.equal(module(emb, one_hot, confidence, generator=_gen(5)), want)
    assert "labels_format='one_hot'" in repr(module)


def test_label_layout_errors_name_the_argument():
    emb, labels, _ = _batch(25, batch=2, size=4, num_classes=3)
    one_hot = F.one_hot(labels, 3).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"\(B, h, w\) or \(B, 1, h, w\).*labels_format='one_hot'"):
        ck.pseudo_label_contrast(emb, one_hot)  # never guessed from the shape
    with pytest.raises(ValueError, match="labels_format must be one of 'index', 'one_hot'"):
        ck.PseudoLabelContrast(labels_format="onehot")
    with pytest.raises(ValueError, match="num_classes=4 but the one-hot labels have 3 channels"):
        ck.pseudo_label_contrast(emb, one_hot, labels_format="one_hot", num_classes=4)
    with pytest.raises(ValueError, match=r"labels_format='one_hot' must be a non-empty \(B, K, h, w\)"):
        ck.pseudo_label_contrast(emb, labels, labels_format="one_hot")
    with pytest.raises(ValueError, match="ignore_index=1 is a class id"):
        ck.pseudo_label_contrast(emb, one_hot, labels_format="one_hot", ignore_index=1)
    for bad in (one_hot * 2, one_hot + F.one_hot(torch.zeros_like(labels), 3).permute(0, 3, 1, 2)):
        with pytest.raises(ValueError, match="at most one 1 per pixel"):
            ck.pseudo_label_contrast(emb, bad, labels_format="one_hot")
    with pytest.raises(TypeError, match="include_background must be None"):
        ck.PseudoLabelContrast(include_background=1)


def test_downsample_labels_keeps_a_channel_axis():
    labels = torch.randint(0, 3, (2, 1, 8, 6), generator=_gen(26))
    got = ck.downsample_labels(labels, (4, 3))
    assert got.shape == (2, 1, 4, 3)
    assert torch.equal(got[:, 0], ck.downsample_labels(labels[:, 0], (4, 3)))


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
def test_tensor_subclasses_give_the_plain_result_as_a_plain_tensor(mode):
    emb, labels, confidence = _batch(27, batch=2, size=4, num_classes=3)
    kw = dict(mode=mode, anchors_per_class=3)
    want = ck.pseudo_label_contrast(emb, labels, confidence, generator=_gen(1), **kw)
    leaf = emb.clone().as_subclass(_Tagged).requires_grad_()
    got = ck.pseudo_label_contrast(leaf, labels.as_subclass(_Tagged), confidence.as_subclass(_Tagged),
                                   generator=_gen(1), **kw)
    assert type(got) is torch.Tensor and torch.equal(got, want)
    got.backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    labels_out, conf_out = ck.pseudo_labels(torch.randn(2, 3, 4, 4).as_subclass(_Tagged))
    assert type(labels_out) is torch.Tensor and type(conf_out) is torch.Tensor
    assert type(ck.downsample_labels(labels.as_subclass(_Tagged), 2)) is torch.Tensor


@pytest.mark.parametrize("mode", ["prototype", "pixel"])
def test_monai_metatensor_batches_give_the_plain_result(mode):
    monai_data = pytest.importorskip("monai.data")
    g = _gen(28)
    items = [{"image": monai_data.MetaTensor(torch.randn(4, 6, 6, generator=g, dtype=torch.float64),
                                             meta={"filename_or_obj": f"case{i}.nii.gz"}),
              "label": monai_data.MetaTensor(torch.randint(0, 2, (1, 6, 6), generator=g),
                                             meta={"filename_or_obj": f"case{i}_seg.nii.gz"})}
             for i in range(3)]
    batch = next(iter(monai_data.DataLoader(items, batch_size=3)))
    emb, labels = batch["image"], batch["label"]  # (B, 4, 6, 6), (B, 1, 6, 6) MetaTensors
    assert isinstance(labels, monai_data.MetaTensor)
    plain_emb, plain_labels = emb.as_subclass(torch.Tensor), labels.as_subclass(torch.Tensor)[:, 0]
    for kw in (dict(), dict(anchors_per_class=5)):
        want = ck.pseudo_label_contrast(plain_emb, plain_labels, mode=mode, generator=_gen(2), **kw)
        got = ck.PseudoLabelContrast(mode=mode, **kw)(emb, labels, generator=_gen(2))
        assert type(got) is torch.Tensor and torch.equal(got, want)
    pl_labels, pl_conf = ck.pseudo_labels(emb)
    assert type(pl_labels) is torch.Tensor and type(pl_conf) is torch.Tensor
    assert torch.equal(pl_labels, ck.pseudo_labels(plain_emb)[0])
    anchors = sample_anchors(labels[:, 0], labels[:, 0] >= 0, 2, _gen(0))
    assert type(anchors) is torch.Tensor
    assert torch.equal(anchors, sample_anchors(plain_labels, plain_labels >= 0, 2, _gen(0)))


def test_sample_pixels_is_class_balanced_and_refuses_bad_input():
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(-1, 3, (3, 9, 7), generator=g)
    labels[0, :, :5] = 0  # a dominant background in image 0
    mask = ck.sample_pixels(labels, 4, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == labels.shape
    assert not mask[labels < 0].any()  # ignored pixels are never drawn
    for image in range(3):
        for c in range(3):
            count = int((labels[image] == c).sum())
            assert int(mask[image][labels[image] == c].sum()) == min(4, count)
    confident = torch.rand(labels.shape, generator=g) > 0.5
    only = ck.sample_pixels(labels, 2, usable=confident & (labels >= 0), generator=torch.Generator().manual_seed(0))
    assert not only[~confident].any()
    for bad, match in (((labels.float(), 2), "integer label map"), ((labels, 0), "per_class"),
                       ((labels[0], 2), "integer label map")):
        with pytest.raises(ValueError, match=match):
            ck.sample_pixels(*bad)
    with pytest.raises(ValueError, match="usable must be a bool mask"):
        ck.sample_pixels(labels, 2, usable=confident[:2])
