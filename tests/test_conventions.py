"""One set of conventions for every loss module: the same ``reduction`` values everywhere, with
'sum' the sum of the per-anchor losses of 'none' and 'mean' their mean over the anchors that
contribute; an unknown value is refused by name."""

import pytest
import torch

import contrastkit as ck


def cases():
    # float64: a contributing anchor's loss can round to exactly 0 in float32 (a positive far above
    # its negatives), and the test counts the contributing anchors by their non-zero losses
    torch.set_default_dtype(torch.float64)
    try:
        return _cases()
    finally:
        torch.set_default_dtype(torch.float32)


def _cases():
    g = torch.Generator().manual_seed(3)
    maps = torch.randn(2, 6, 8, 8, generator=g), torch.randn(2, 6, 8, 8, generator=g)
    cells = torch.randn(2, 6, 2, 2, generator=g), torch.randn(2, 6, 2, 2, generator=g)
    labels = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels[:, 0, :2] = torch.tensor([1, 2])  # both foreground classes in every image: every anchor has a negative
    z = torch.randn(8, 5, generator=g)
    ids = (torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 0, 0, 1, 1]),
           torch.tensor([0, 1, 0, 1, 0, 1, 0, 1]))
    seeded = {"generator": torch.Generator().manual_seed(0)}
    return {
        "CrossLevelContrast": (ck.CrossLevelContrast, {}, cells, {}),
        "CrossLevelConsistency": (ck.CrossLevelConsistency, {}, (torch.randn(8, 1, 4, 4, generator=g),
                                                                  torch.randn(2, 1, 8, 8, generator=g)), {}),
        "NTXentLoss": (ck.NTXentLoss, {}, (z[:4], z[4:]), {}),
        "SupConLoss": (ck.SupConLoss, {}, (z, torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])), {}),
        "PatchNCELoss": (ck.PatchNCELoss, {"num_patches": 6}, maps, seeded),
        "LocalContrast": (ck.LocalContrast, {"region_grid": 2}, maps, {}),
        "GlobalContrast": (ck.GlobalContrast, {}, (z, *ids), {}),
        "PseudoLabelContrast": (ck.PseudoLabelContrast, {"num_classes": 3}, (maps[0], labels), {}),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_every_module_reduces_alike(name):
    module, options, inputs, call = cases()[name]

    def run(reduction):
        kwargs = {k: torch.Generator().manual_seed(0) if k == "generator" else v for k, v in call.items()}
        return module(**options, reduction=reduction)(*inputs, **kwargs)

    rows, total, mean = run("none"), run("sum"), run("mean")
    assert rows.dim() >= 1 and total.dim() == 0 and mean.dim() == 0
    torch.testing.assert_close(total, rows.sum())
    contributing = (rows != 0).sum()
    torch.testing.assert_close(mean, rows.sum() / contributing)
    with pytest.raises(ValueError, match="reduction"):
        module(**options, reduction="average")
