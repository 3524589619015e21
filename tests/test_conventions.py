"""One set of conventions for every loss module: the same ``reduction`` values everywhere, with
'sum' the sum of the per-anchor losses of 'none' and 'mean' their mean over the anchors that
contribute; an unknown value is refused by name."""

import inspect
import random

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



# ------------------------------------------------------------------ one definition of the settings

# Each module, its function, and the function's keyword-only arguments that are inputs of each call
# (given to forward), not settings.
FUNCTIONS = {
    "CrossLevelContrast": (ck.cross_level_contrast, ()),
    "CrossLevelConsistency": (ck.cross_level_consistency, ("grid",)),
    "NTXentLoss": (ck.nt_xent_loss, ("queue",)),
    "SupConLoss": (ck.supcon_loss, ("queue",)),
    "PatchNCELoss": (ck.patch_nce_loss, ("generator", "queue")),
    "LocalContrast": (ck.local_contrast, ("queue",)),
    "GlobalContrast": (ck.global_contrast, ("queue",)),
    "PseudoLabelContrast": (ck.pseudo_label_contrast, ("generator",)),
}

# Valid values of every setting for the inputs of _cases(), in any combination; a flag is True or False.
CHOICES = {
    "temperature": [0.05, 0.3, 1.0],
    "negatives": ["image", "batch"],
    "reduction": ["mean", "sum", "none"],
    "backend": ["auto", "dense", "torch", "reference"],
    "denominator": ["all", "each_positive", "negatives"],
    "strategy": ["GR", "GD-", "GD"],
    "activation": ["sigmoid", "multilabel"],  # the inputs are 1-channel logits
    "num_patches": [None, 3, 64],
    "region_grid": [4, (2, 4)],  # 2R - 2 >= 6 other regions: room for 1 or 2 hardest negatives
    "negatives_per_region": [None, 1, 2],
    "mode": ["prototype", "pixel"],
    "anchors_per_class": [None, 1, 5],
    "include_background": [None, True, False],
    "ignore_index": [-1, -100],
    "confidence_threshold": [None, 0.5],
    "num_classes": [None, 3],
    "labels_format": ["index"],
}
FLAGS = ("detach_local", "symmetric", "normalize", "gather_distributed", "detach_full")
# The only setting still taken positionally too (its first): GlobalContrast("GR").
POSITIONAL = {"GlobalContrast": ("strategy",)}


def settings_of(name):
    """The function's settings: its keyword-only arguments less the per-call inputs, with their defaults."""
    function, per_call = FUNCTIONS[name]
    return [(p.name, p.default) for p in inspect.signature(function).parameters.values()
            if p.kind is p.KEYWORD_ONLY and p.name not in per_call]


def test_every_loss_module_is_covered():
    modules = {name for name in ck.__all__ if isinstance(getattr(ck, name), type)
               and issubclass(getattr(ck, name), torch.nn.Module) and getattr(ck, name) is not ck.TemperatureModule
               and name not in ("MemoryQueue",)}
    assert modules == set(FUNCTIONS) == set(cases())


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_the_constructor_takes_exactly_the_functions_settings(name):
    module = getattr(ck, name)
    expected = settings_of(name)
    if any(key == "temperature" for key, _ in expected):
        expected.append(("learnable_temperature", False))
    parameters = list(inspect.signature(module).parameters.values())
    assert [(p.name, p.default) for p in parameters] == expected
    positional = POSITIONAL.get(name, ())
    assert [p.name for p in parameters if p.kind is p.POSITIONAL_OR_KEYWORD] == list(positional)
    assert all(p.kind is p.KEYWORD_ONLY for p in parameters[len(positional):])
    with pytest.raises(TypeError, match=f"^{name}.__init__\\(\\) got an unexpected keyword argument 'tau'$"):
        module(tau=0.1)
    takes = f"from 1 to {len(positional) + 1} positional arguments" if positional else "1 positional argument"
    with pytest.raises(TypeError, match=f"^{name}.__init__\\(\\) takes {takes} but {len(positional) + 2} were given$"):
        module(*[default for _, default in expected[: len(positional) + 1]])


def _call(loss, inputs, call, **settings):
    torch.manual_seed(0)  # pixel mode draws its anchors from the global generator when given none
    per_call = {key: torch.Generator().manual_seed(0) if key == "generator" else value for key, value in call.items()}
    return loss(*inputs, **per_call, **settings)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_the_module_is_the_function_with_its_settings(name):
    module, _, inputs, call = cases()[name]
    function, _ = FUNCTIONS[name]
    draw = random.Random(name)
    for _ in range(6):
        settings = {key: draw.choice(CHOICES[key] if key not in FLAGS else [True, False])
                    for key, _ in settings_of(name)}
        loss = module(**settings)
        for key, value in settings.items():
            if key != "temperature":
                assert getattr(loss, key) == value and f"{key}={value!r}" in repr(loss)
        expected = _call(function, inputs, call, **settings)
        torch.testing.assert_close(_call(loss, inputs, call), expected, rtol=0, atol=0, msg=str(settings))
