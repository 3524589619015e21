"""torch.compile(fullgraph=True) traces every loss module, learned temperature included.

fullgraph=True turns any graph break into an error; "aot_eager" checks tracing, the custom ops'
fake implementations and the compiled autograd on the CPU without C++ code generation.
"""

from __future__ import annotations

import pytest
import torch
from test_temperature import MODULES, inputs

from contrastkit import PseudoLabelContrast


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
