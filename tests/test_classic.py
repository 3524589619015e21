"""NT-Xent, SupCon and PatchNCE against float64 formulas written here and pytorch-metric-learning."""

import math

import pytest
import torch

from contrastkit import (
    MemoryQueue,
    NTXentLoss,
    PatchNCELoss,
    SupConLoss,
    info_nce,
    nt_xent_loss,
    patch_nce_loss,
    supcon_loss,
)
from contrastkit.classic import sample_locations

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")


def cosine(a, b):
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)
    return a @ b.T


def supcon_formula(rows, labels, tau, extra_keys=None, extra_labels=None):
    """-(1/|P_i|) sum_p log( exp(s_ip) / sum_{a != i} exp(s_ia) ), mean over anchors with positives."""
    keys, key_labels = rows, labels
    if extra_keys is not None:
        keys, key_labels = torch.cat([rows, extra_keys]), torch.cat([labels, extra_labels])
    s = cosine(rows, keys) / tau
    losses = []
    for i in range(rows.shape[0]):
        others = [a for a in range(keys.shape[0]) if a != i]
        positives = [p for p in others if key_labels[p] == labels[i]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(s[i, a]) for a in others))
        losses.append(-sum(s[i, p].item() - log_denominator for p in positives) / len(positives))
    return sum(losses) / len(losses) if losses else 0.0


def ntxent_formula(z1, z2, tau, extra_keys=None):
    """SimCLR eq. (1): l(i, j) = -log exp(s_ij) / sum_{k != i} exp(s_ik), mean over the 2N anchors."""
    n = z1.shape[0]
    labels = torch.arange(n).repeat(2)
    extra_labels = None if extra_keys is None else torch.full((extra_keys.shape[0],), n)
    return supcon_formula(torch.cat([z1, z2]), labels, tau, extra_keys, extra_labels)


@pytest.mark.parametrize("tau", [0.5, 0.1])
def test_ntxent_matches_formula_and_pml(tau):
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    ours = NTXentLoss(temperature=tau)(z1, z2)
    assert ours.dtype == torch.float64
    assert ours.item() == pytest.approx(ntxent_formula(z1, z2, tau), rel=1e-10)
    pml = pml_losses.NTXentLoss(temperature=tau)(torch.cat([z1, z2]), torch.arange(6).repeat(2))
    assert ours.item() == pytest.approx(pml.item(), rel=1e-9)


def test_ntxent_reduction_none_orders_z1_first():
    torch.manual_seed(1)
    z1, z2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    per_anchor = nt_xent_loss(z1, z2, reduction="none")
    swapped = nt_xent_loss(z2, z1, reduction="none")
    assert per_anchor.shape == (8,)
    torch.testing.assert_close(per_anchor, torch.cat([swapped[4:], swapped[:4]]))
    torch.testing.assert_close(per_anchor.mean(), nt_xent_loss(z1, z2))


def test_ntxent_gradcheck():
    torch.manual_seed(2)
    z1 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, temperature=0.5), (z1, z2))


def test_ntxent_queue_keys_are_negatives():
    torch.manual_seed(3)
    z1, z2 = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    queue = MemoryQueue(8, 6, dtype=torch.float64)
    past = torch.randn(5, 6, dtype=torch.float64)
    queue.enqueue(past)
    assert nt_xent_loss(z1, z2, queue=queue).item() == pytest.approx(
        ntxent_formula(z1, z2, 0.5, extra_keys=past), rel=1e-10
    )


def test_ntxent_bad_input():
    z = torch.randn(4, 3)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(z, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        nt_xent_loss(z[None], z[None])
    with pytest.raises(TypeError, match="z2 must be a torch.Tensor"):
        nt_xent_loss(z, z.numpy())
    with pytest.raises(TypeError, match="dtype"):
        nt_xent_loss(z, z.double())
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(TypeError, match="gather_distributed"):
        nt_xent_loss(z, z, gather_distributed=1)
    with pytest.raises(ValueError, match="NaN"):
        nt_xent_loss(z, torch.full_like(z, float("nan")))


def test_ntxent_single_pair_is_finite():
    z1, z2 = torch.randn(1, 3), torch.randn(1, 3)
    loss = nt_xent_loss(z1, z2)  # one negative-free anchor pair: log(1) = 0
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.07])
def test_supcon_matches_formula_and_pml_with_views(tau):
    torch.manual_seed(4)
    features = torch.randn(6, 2, 5, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 3])
    ours = SupConLoss(temperature=tau)(features, labels)
    rows = torch.cat([features[:, 0], features[:, 1]])  # view-major, as documented
    row_labels = labels.repeat(2)
    assert ours.item() == pytest.approx(supcon_formula(rows, row_labels, tau), rel=1e-10)
    pml = pml_losses.SupConLoss(temperature=tau)(rows, row_labels)
    assert ours.item() == pytest.approx(pml.item(), rel=1e-9)


def test_supcon_single_view_matches_pml_and_skips_anchors_without_positives():
    torch.manual_seed(5)
    features = torch.randn(7, 4, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # samples 2 and 6 have no positive
    ours = supcon_loss(features, labels)
    assert ours.item() == pytest.approx(supcon_formula(features, labels, 0.1), rel=1e-10)
    pml = pml_losses.SupConLoss(temperature=0.1)(features, labels)
    assert ours.item() == pytest.approx(pml.item(), rel=1e-9)
    per_sample = supcon_loss(features, labels, reduction="none")
    assert per_sample[2] == 0 and per_sample[6] == 0 and (per_sample[[0, 1, 3, 4, 5]] > 0).all()


def test_supcon_without_labels_is_ntxent():
    torch.manual_seed(6)
    z1, z2 = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(supcon_loss(torch.stack([z1, z2], 1), temperature=0.5), nt_xent_loss(z1, z2))


def test_supcon_reduction_none_shape_and_ignore_index():
    torch.manual_seed(7)
    features = torch.randn(4, 3, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, -1, 0])
    per_row = supcon_loss(features, labels, reduction="none")
    assert per_row.shape == (4, 3)
    assert (per_row[2] == 0).all()
    kept = torch.tensor([0, 1, 3])
    torch.testing.assert_close(supcon_loss(features, labels), supcon_loss(features[kept], labels[kept]))


@pytest.mark.parametrize("denominator", ["all", "each_positive", "negatives"])
def test_supcon_gradcheck(denominator):
    torch.manual_seed(8)
    features = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1])
    assert torch.autograd.gradcheck(lambda f: supcon_loss(f, labels, denominator=denominator), (features,))


def test_supcon_no_positive_pair_is_zero_with_gradient():
    features = torch.randn(4, 5, requires_grad=True)
    loss = supcon_loss(features, torch.arange(4))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(features.grad, torch.zeros_like(features))
    one_view = supcon_loss(torch.randn(3, 1, 5), torch.tensor([0, 1, 2]))
    assert one_view.item() == 0.0


def test_supcon_half_precision_is_finite():
    torch.manual_seed(9)
    features = torch.randn(8, 2, 16)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    for dtype in (torch.bfloat16, torch.float16):
        loss = supcon_loss(features.to(dtype), labels)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert loss.item() == pytest.approx(supcon_loss(features, labels).item(), rel=2e-2)


def test_supcon_bad_input():
    with pytest.raises(ValueError, match="labels is required"):
        supcon_loss(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"\(N, D\), \(N, V, D\) or a \(B, C, H, W\) map"):
        supcon_loss(torch.randn(4), torch.arange(4))
    with pytest.raises(ValueError, match="labels must hold one entry per sample"):
        supcon_loss(torch.randn(4, 2, 3), torch.arange(8))
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        supcon_loss(torch.randn(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="denominator"):
        SupConLoss(denominator="some")
    with pytest.raises(ValueError, match="labels must be non-negative"):
        supcon_loss(torch.randn(4, 3), torch.tensor([0, 1, -3, 1]))
    queue = MemoryQueue(4, 3)
    queue.enqueue(torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs a queue that holds labels"):
        supcon_loss(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), queue=queue)


def patch_nce_formula(feat_q, feat_k, where, tau, extra_keys=None):
    """CUT: per query, cross-entropy of [l_pos, l_neg (other sampled keys of its image)] / tau."""
    losses = []
    for image in range(feat_q.shape[0]):
        q = feat_q[image].flatten(1).T[where[image]]
        k = feat_k[image].flatten(1).T[where[image]]
        if extra_keys is not None:
            k = torch.cat([k, extra_keys])
        s = cosine(q, k) / tau
        for i in range(q.shape[0]):
            losses.append(torch.logsumexp(s[i], 0).item() - s[i, i].item())
    return sum(losses) / len(losses)


def test_patch_nce_all_locations_matches_formula():
    torch.manual_seed(10)
    feat_q = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    feat_k = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    every = torch.arange(9).expand(2, 9)
    expected = patch_nce_formula(feat_q, feat_k, every, 0.07)
    assert PatchNCELoss(num_patches=None)(feat_q, feat_k).item() == pytest.approx(expected, rel=1e-10)
    assert patch_nce_loss(feat_q, feat_k, num_patches=100).item() == pytest.approx(expected, rel=1e-10)


def test_patch_nce_sampled_locations_match_formula_and_queue():
    torch.manual_seed(11)
    feat_q = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    feat_k = torch.randn(3, 5, 4, 4, dtype=torch.float64)
    where = sample_locations(3, 16, 6, feat_q.device, torch.Generator().manual_seed(0))
    assert where.shape == (3, 6)
    assert all(len(set(row.tolist())) == 6 for row in where) and where.max() < 16
    assert not torch.equal(where[0], where[1])  # drawn per image
    loss = patch_nce_loss(feat_q, feat_k, num_patches=6, generator=torch.Generator().manual_seed(0),
                          temperature=0.2)
    assert loss.item() == pytest.approx(patch_nce_formula(feat_q, feat_k, where, 0.2), rel=1e-10)

    queue = MemoryQueue(10, 5, dtype=torch.float64)
    past = torch.randn(7, 5, dtype=torch.float64)
    queue.enqueue(past)
    with_queue = patch_nce_loss(feat_q, feat_k, num_patches=6, generator=torch.Generator().manual_seed(0),
                                temperature=0.2, queue=queue)
    assert with_queue.item() == pytest.approx(patch_nce_formula(feat_q, feat_k, where, 0.2, past), rel=1e-10)


def test_patch_nce_detaches_keys_and_gradchecks():
    torch.manual_seed(12)
    feat_q = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    feat_k = torch.randn(2, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    patch_nce_loss(feat_q, feat_k).backward()
    assert feat_k.grad is None and feat_q.grad is not None
    assert torch.autograd.gradcheck(lambda q: patch_nce_loss(q, feat_k, num_patches=None), (feat_q,))


def test_patch_nce_bad_input():
    feat = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="num_patches"):
        PatchNCELoss(num_patches=0)
    with pytest.raises(ValueError, match="num_patches"):
        patch_nce_loss(feat, feat, num_patches=2.5)
    with pytest.raises(ValueError, match="same shape"):
        patch_nce_loss(feat, feat[:, :, :2])
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        patch_nce_loss(feat[0], feat[0])
    with pytest.raises(TypeError, match="generator"):
        patch_nce_loss(feat, feat, num_patches=3, generator=0)


def test_gather_distributed_without_process_group_is_the_local_loss():
    torch.manual_seed(13)
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    torch.testing.assert_close(nt_xent_loss(z1, z2, gather_distributed=True), nt_xent_loss(z1, z2))
    features, labels = torch.randn(4, 2, 3), torch.tensor([0, 1, 0, 2])
    gathered = supcon_loss(features, labels, gather_distributed=True)
    torch.testing.assert_close(gathered, supcon_loss(features, labels))
    torch.testing.assert_close(supcon_loss(features, gather_distributed=True), supcon_loss(features))


# --- one core call for the batch, equal to v1's per-image loop --------------------------------------

@pytest.mark.parametrize("with_queue", [False, True])
def test_patch_nce_is_one_call_equal_to_the_v1_loop(monkeypatch, with_queue):
    import contrastkit.classic as module
    import contrastkit.core

    g = torch.Generator().manual_seed(12)
    feat_q = torch.randn(3, 5, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    feat_k = torch.randn(3, 5, 4, 4, dtype=torch.float64, generator=g)
    queue = None
    if with_queue:
        queue = MemoryQueue(6, 5, dtype=torch.float64)
        queue.enqueue(torch.randn(6, 5, dtype=torch.float64, generator=g))
    # v1: the same locations, one info_nce call per image, queue keys labelled P (negatives)
    where = sample_locations(3, 16, 7, feat_q.device, torch.Generator().manual_seed(3))[..., None].expand(-1, -1, 5)
    queries = feat_q.flatten(2).transpose(1, 2).gather(1, where)
    keys = feat_k.flatten(2).transpose(1, 2).gather(1, where)
    labels = torch.arange(7)
    key_labels = labels if queue is None else torch.cat([labels, torch.full((6,), 7)])
    want = sum(info_nce(queries[i], keys[i] if queue is None else torch.cat([keys[i], queue.keys]), labels=labels,
                        key_labels=key_labels, temperature=0.07, reduction="sum") for i in range(3)) / 21

    calls = []
    original = contrastkit.core.info_nce
    monkeypatch.setattr(module, "info_nce", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    got = patch_nce_loss(feat_q, feat_k, num_patches=7, generator=torch.Generator().manual_seed(3), queue=queue)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(torch.autograd.grad(got, feat_q)[0], torch.autograd.grad(want, feat_q)[0],
                               rtol=1e-12, atol=1e-13)


def test_supcon_on_a_feature_map_is_supcon_over_its_pixels():
    g = torch.Generator().manual_seed(7)
    maps = torch.randn(2, 5, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(-1, 3, (2, 3, 4), generator=g)
    rows = maps.detach().permute(0, 2, 3, 1).reshape(-1, 5).clone().requires_grad_(True)
    want = supcon_loss(rows, labels.reshape(-1), reduction="none")
    got = supcon_loss(maps, labels, reduction="none")
    assert got.shape == (2, 3, 4)
    torch.testing.assert_close(got.reshape(-1), want)
    want.sum().backward()
    got.sum().backward()
    torch.testing.assert_close(maps.grad.permute(0, 2, 3, 1).reshape(-1, 5), rows.grad)
    torch.testing.assert_close(SupConLoss()(maps, labels[:, None]), supcon_loss(maps, labels))
    with pytest.raises(ValueError, match=r"labels for a \(B, C, H, W\)"):
        supcon_loss(maps, labels[:, :2])
    with pytest.raises(ValueError, match="labels is required for \\(B, C, H, W\\)"):
        supcon_loss(maps)


def test_supcon_map_takes_one_hot_labels_on_request():
    """labels_format='one_hot' on a (B, C, H, W) map: the same loss as its class ids (a pixel with no 1
    is ignored), checked values, and a clear error for bad one-hot maps, rows or an unknown format."""
    g = torch.Generator().manual_seed(4)
    features = torch.randn(2, 6, 4, 5, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 3, (2, 4, 5), generator=g)
    ids[0, 0, :2] = -1
    one_hot = torch.nn.functional.one_hot(ids.clamp_min(0), 3).permute(0, 3, 1, 2).clone()
    one_hot[0, :, 0, :2] = 0
    for reduction in ("mean", "none"):
        torch.testing.assert_close(SupConLoss(labels_format="one_hot", reduction=reduction)(features, one_hot),
                                   supcon_loss(features, ids, reduction=reduction, backend="reference"))
    bad = one_hot.clone()
    bad[1, :, 2, 3] = 1  # three classes at one pixel
    with pytest.raises(ValueError, match="0s and 1s, at most one 1 per pixel"):
        supcon_loss(features, bad, labels_format="one_hot")
    with pytest.raises(ValueError, match=r"must be \(B, K, H, W\) one-hot"):
        supcon_loss(features, one_hot[:, :, :3], labels_format="one_hot")
    with pytest.raises(ValueError, match="applies to \\(B, C, H, W\\) feature maps"):
        supcon_loss(features.flatten(1), ids[:, 0, 0], labels_format="one_hot")
    with pytest.raises(ValueError, match="labels_format must be one of"):
        SupConLoss(labels_format="onehot")
