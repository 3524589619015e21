"""torch.compile(fullgraph=True) traces every loss module, learned temperature included.

fullgraph=True turns any graph break into an error; "aot_eager" checks tracing, the custom ops'
fake implementations and the compiled autograd on the CPU without C++ code generation.
"""

from __future__ import annotations

import pytest
import torch
from test_temperature import MODULES, inputs

from contrastkit import PseudoLabelContrast, value_checks


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_every_loss_module_compiles_without_a_graph_break(module):
    torch._dynamo.reset()
    args = list(inputs(module.__name__, torch.Generator().manual_seed(0)))
    # Prototype mode reads the class count from the labels unless num_classes is given.
    extra = dict(num_classes=3) if module is PseudoLabelContrast else {}
    loss_module = module(temperature=0.3, learnable_temperature=True, backend="torch", **extra).double()
    args[0] = args[0].clone().requires_grad_(True)
    results = []
    for fn in (loss_module, torch.compile(loss_module, fullgraph=True, backend="aot_eager")):
        loss = fn(*args)
        results.append((loss.detach(), *torch.autograd.grad(loss, (args[0], loss_module.log_temperature))))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("activation, channels", [("sigmoid", 1), ("softmax", 3), ("multilabel", 2)])
def test_cross_level_consistency_compiles_without_a_graph_break(activation, channels):
    from contrastkit import CrossLevelConsistency

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    patch = torch.randn(8, channels, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    full = torch.randn(2, channels, 6, 6, generator=g, dtype=torch.float64)
    loss = CrossLevelConsistency(activation=activation)
    results = []
    with value_checks(True):  # the NaN check runs eagerly and is skipped while tracing
        for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
            value = fn(patch, full)
            results.append((value.detach(), *torch.autograd.grad(value, patch)))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=0)


def test_pixel_mode_compiles_with_dynamic_shapes():
    torch._dynamo.reset()
    loss = PseudoLabelContrast(temperature=0.3, mode="pixel", anchors_per_class=4, num_classes=3, backend="torch")
    compiled = torch.compile(loss, fullgraph=True, dynamic=True, backend="aot_eager")
    g = torch.Generator().manual_seed(2)
    for size in (6, 8):  # the second size is where dynamic shapes are traced
        emb = torch.randn(2, 5, size, size, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 3, (2, size, size), generator=g)
        torch.manual_seed(size)
        eager = loss(emb, labels)
        torch.manual_seed(size)
        torch.testing.assert_close(compiled(emb, labels), eager, rtol=1e-10, atol=1e-12)
