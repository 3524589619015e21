"""Every provider of a case computes the same loss and gradient, so the comparison is like for like.

Tiny float64 inputs; "compiled" is checked through the eager dense math it compiles, "triton"
only on a GPU with the kernels. The eager forms of the seed-size table (``seeds.py``) are checked
against the contrastkit modules the same way, and once more at the table's own sizes in float32.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import seeds
from benchmarks.cases import CASES, leaf_inputs, provider_names, unavailable_reason
from contrastkit import CrossLevelContrast, PseudoLabelContrast, SupConLoss, info_nce

SIZES = {"supcon8": 256, "ntxent": 256, "cross_level": 512, "pl_pixel": 512, "pl_prototype": 512}


def _value_and_grads(case, provider, inputs):
    leaves = leaf_inputs(case, inputs)
    loss = provider(leaves)
    loss.backward()
    return loss.detach(), [leaves[k].grad for k in case.grad_inputs]


@pytest.mark.parametrize("case_name", list(CASES))
def test_providers_agree(ck, case_name):
    case = CASES[case_name]
    device = ck.device
    inputs = case.build(SIZES[case_name], 16, torch.float64, torch.device(device), seed=1)
    expected, expected_grads = _value_and_grads(case, case.providers["reference"], inputs)
    assert torch.isfinite(expected) and expected > 0
    checked = []
    for name in provider_names(case):
        if name == "reference" or unavailable_reason(case, name, SIZES[case_name], "quick", device):
            continue
        provider = (lambda x: case.dense(**x)) if name == "compiled" else case.providers[name]
        value, grads = _value_and_grads(case, provider, inputs)
        torch.testing.assert_close(value.double(), expected, rtol=1e-6, atol=1e-9, msg=f"{name} value")
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9, msg=f"{name} gradient")
        checked.append(name)
    assert len(checked) >= 2, f"only {checked} could be compared with the reference"


def test_cross_level_provider_is_the_module():
    case = CASES["cross_level"]
    inputs = case.build(512, 16, torch.float64, torch.device("cpu"), seed=2)
    module_loss = CrossLevelContrast()(inputs["global_map"], inputs["local_rows"])
    torch.testing.assert_close(case.providers["reference"](inputs), module_loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(case.providers["torch"](inputs), module_loss, rtol=1e-10, atol=0)


# --- the eager forms of the seed-size table (benchmarks/test_seed_sizes.py) -----------------------


def _grad(fn, x):
    leaf = x.detach().requires_grad_()
    loss = fn(leaf)
    loss.backward()
    return loss.detach(), leaf.grad


def _assert_same(fn, want_fn, x, rtol=1e-10, atol=1e-12, grad_atol=1e-12):
    got, got_grad = _grad(fn, x)
    want, want_grad = _grad(want_fn, x)
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg="value")
    torch.testing.assert_close(got_grad, want_grad, rtol=rtol, atol=grad_atol, msg="gradient")


MAP_CLASSES = 4  # background and three foreground classes


def _map(b, d, side, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, d, side, side, generator=g, dtype=dtype),
            torch.randint(0, MAP_CLASSES, (b, side, side), generator=g))


@pytest.mark.parametrize("batch", [1, 3])
def test_cross_level_eager_is_the_module(batch):
    g = torch.Generator().manual_seed(batch)
    global_map = torch.randn(batch, 16, 5, 5, generator=g, dtype=torch.float64)
    local_map = torch.randn(batch, 16, 5, 5, generator=g, dtype=torch.float64)
    module = CrossLevelContrast()
    _assert_same(lambda x: seeds.cross_level_eager(x, local_map), lambda x: module(x, local_map), global_map)
    # the PatchNCE form of the seed computes the same
    rows = local_map.flatten(2).transpose(1, 2).reshape(-1, 16)
    _assert_same(lambda x: seeds.patch_nce(x, rows), lambda x: module(x, local_map), global_map)


def test_prototype_eager_is_the_module():
    embeddings, labels = _map(4, 8, 6)
    labels[1] = labels[1].clamp_max(1)  # one foreground class only
    labels[2] = 0  # no foreground at all
    module = PseudoLabelContrast(mode="prototype", num_classes=MAP_CLASSES)
    _assert_same(lambda x: seeds.prototype_eager(x, labels, MAP_CLASSES), lambda x: module(x, labels), embeddings)
    pairs = torch.tensor([2, 3, 0, 3])  # image 3 paired with itself
    _assert_same(lambda x: seeds.prototype_eager(x, labels, MAP_CLASSES, pair_index=pairs),
                 lambda x: module(x, labels, pair_index=pairs), embeddings)


@pytest.mark.parametrize("form", ["supcon_eager", "supcon_masked"])
def test_supcon_eager_is_info_nce(form):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(200, 16, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 8, (200,), generator=g)
    labels[0] = 9  # a class of one: that row has no positive and takes no part
    eager = getattr(seeds, form)
    _assert_same(lambda x: eager(x, labels), lambda x: info_nce(x, labels=labels), z)
    _assert_same(lambda x: eager(x, labels), lambda x: SupConLoss()(x, labels), z)


def test_sample_per_class_draws_min_of_count_and_budget():
    _, labels = _map(3, 1, 12)
    labels[0, :2] = -1  # ignored pixels are never drawn
    masks = [seeds.sample_per_class(labels, 20, MAP_CLASSES, torch.Generator().manual_seed(s)) for s in (0, 1)]
    for mask in masks:
        assert not (mask & (labels <= 0)).any()
        for b in range(3):
            for c in range(1, MAP_CLASSES):
                count = int((labels[b] == c).sum())
                assert int((mask[b] & (labels[b] == c)).sum()) == min(20, count)
    assert not torch.equal(*masks)


def _module_anchors(module, embeddings, labels, generator_seed):
    """The pixels the module drew as anchors: exactly those whose rows receive a gradient."""
    _, grad = _grad(lambda x: module(x, labels, generator=torch.Generator().manual_seed(generator_seed)),
                    embeddings)
    return grad.abs().amax(dim=1) > 0


def test_pixel_eager_is_the_module_on_its_anchors():
    embeddings, labels = _map(3, 8, 8)
    module = PseudoLabelContrast(mode="pixel", anchors_per_class=5, num_classes=MAP_CLASSES)
    anchors = _module_anchors(module, embeddings, labels, 0)
    counts = [min(5, int((labels[b] == c).sum())) for b in range(3) for c in range(1, MAP_CLASSES)]
    assert int(anchors.sum()) == sum(counts)
    _assert_same(lambda x: seeds.pixel_supcon(x, labels, anchors, MAP_CLASSES),
                 lambda x: module(x, labels, generator=torch.Generator().manual_seed(0)), embeddings)


# At the sizes of the table, float32: the same values to float32 rounding.
F32 = dict(rtol=2e-5, atol=1e-6, grad_atol=1e-8)


@pytest.mark.parametrize("batch", [8, 24])
def test_cross_level_eager_at_the_seed_size(batch):
    global_map, _ = _map(batch, 128, 5, torch.float32, seed=4)
    local_map, _ = _map(batch, 128, 5, torch.float32, seed=5)
    _assert_same(lambda x: seeds.cross_level_eager(x, local_map), lambda x: CrossLevelContrast()(x, local_map),
                 global_map, **F32)


def test_pseudo_label_eager_forms_at_the_seed_size():
    embeddings, labels = _map(8, 32, 64, torch.float32, seed=6)
    module = PseudoLabelContrast(mode="prototype", num_classes=MAP_CLASSES)
    _assert_same(lambda x: seeds.prototype_eager(x, labels, MAP_CLASSES), lambda x: module(x, labels),
                 embeddings, **F32)
    module = PseudoLabelContrast(mode="pixel", anchors_per_class=128, num_classes=MAP_CLASSES)
    anchors = _module_anchors(module, embeddings, labels, 7)
    assert int(anchors.sum()) == 8 * 3 * 128
    _assert_same(lambda x: seeds.pixel_supcon(x, labels, anchors, MAP_CLASSES),
                 lambda x: module(x, labels, generator=torch.Generator().manual_seed(7)), embeddings, **F32)


def test_supcon_eager_at_the_seed_size():
    g = torch.Generator().manual_seed(8)
    z = torch.randn(4096, 128, generator=g)
    labels = torch.randint(0, 8, (4096,), generator=g)
    _assert_same(lambda x: seeds.supcon_eager(x, labels, num_classes=8), lambda x: info_nce(x, labels=labels),
                 z, **F32)
