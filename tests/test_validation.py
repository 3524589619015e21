"""The value-check switch: defaults by device, the environment variable, the setter, and that
every entry point's value checks follow it."""

from __future__ import annotations

import pytest
import torch

import contrastkit as ck
from contrastkit._validation import VALUE_CHECKS_ENV, value_checks_enabled

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_defaults_are_on_for_cpu_and_off_for_cuda(monkeypatch):
    monkeypatch.delenv(VALUE_CHECKS_ENV, raising=False)
    assert value_checks_enabled(CPU) and not value_checks_enabled(CUDA)


@pytest.mark.parametrize("setting, enabled", [("1", True), ("on", True), ("0", False), ("false", False)])
def test_the_environment_overrides_the_default(monkeypatch, setting, enabled):
    monkeypatch.setenv(VALUE_CHECKS_ENV, setting)
    assert value_checks_enabled(CPU) is enabled and value_checks_enabled(CUDA) is enabled


def test_a_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(VALUE_CHECKS_ENV, "maybe")
    with pytest.raises(ValueError, match=VALUE_CHECKS_ENV):
        value_checks_enabled(CPU)


def test_the_setter_overrides_the_environment_and_none_restores_it(monkeypatch):
    monkeypatch.setenv(VALUE_CHECKS_ENV, "0")
    try:
        ck.set_value_checks(True)
        assert value_checks_enabled(CPU) and value_checks_enabled(CUDA)
        with ck.value_checks(False):
            assert not value_checks_enabled(CPU)
        assert value_checks_enabled(CPU)
    finally:
        ck.set_value_checks(None)
    assert not value_checks_enabled(CPU)
    with pytest.raises(TypeError, match="enabled"):
        ck.set_value_checks(1)


def _nan_rows():
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    return x


CALLS = {
    "info_nce": lambda x: ck.info_nce(x, labels=torch.tensor([0, 0, 1, 1, 2, 2])),
    "weights": lambda x: ck.info_nce(x.nan_to_num(), labels=torch.tensor([0, 0, 1, 1, 2, 2]),
                                     weights=torch.tensor([1.0, -1, 1, 1, 1, 1])),
    "label range": lambda x: ck.info_nce(x.nan_to_num(), labels=torch.tensor([0, 0, 1, 1, -5, 2])),
    "pseudo_labels": lambda x: ck.pseudo_labels(x.reshape(1, 6, 2, 2)),
    "consistency": lambda x: ck.cross_level_consistency(x.reshape(6, 1, 2, 2), x.reshape(6, 1, 2, 2)),
    "queue": lambda x: ck.MemoryQueue(8, 4).enqueue(x),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_every_value_check_follows_the_switch(call):
    with pytest.raises(ValueError):
        CALLS[call](_nan_rows())
    with ck.value_checks(False):
        CALLS[call](_nan_rows())  # unchecked: no sync, no error (NaN in, NaN out)


@pytest.mark.parametrize("tau", [1e-40, 1e-7, 1e7, 1e39])
def test_temperature_outside_its_range_is_refused_by_name(tau):
    x = torch.randn(6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"temperature must lie in \[1e-06, 1e\+06\]"):
        ck.info_nce(x, labels=labels, temperature=tau)
    with pytest.raises(ValueError, match=r"temperature must lie in"):
        ck.info_nce(x, labels=labels, temperature=torch.tensor(tau, dtype=torch.float64))
    for edge in (1e-6, 1e6):  # the range's ends are accepted, with finite gradients
        t = torch.tensor(edge, requires_grad=True)
        ck.info_nce(x, labels=labels, temperature=t).backward()
        assert torch.isfinite(t.grad)


def test_messages_name_the_argument_the_user_passed():
    g = torch.Generator().manual_seed(0)
    global_map, local_map = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    local_map[1, 0, 0, 0] = float("nan")
    for symmetric in (False, True):
        with pytest.raises(ValueError, match="^local_map contains NaN"):
            ck.cross_level_contrast(global_map, local_map, symmetric=symmetric)
    z1, z2 = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    z2[0, 0] = float("inf")
    with pytest.raises(ValueError, match="^z1 or z2 contains NaN"):
        ck.nt_xent_loss(z1, z2)
    with pytest.raises(ValueError, match="^f1 must not be empty"):
        ck.local_contrast(torch.randn(0, 4, 4, 4), torch.randn(0, 4, 4, 4), region_grid=2)


def test_meta_tensors_run_or_say_what_they_lack():
    maps = torch.randn(2, 4, 4, 4, device="meta")
    labels = torch.zeros(2, 4, 4, dtype=torch.long, device="meta")
    assert ck.pseudo_label_contrast(maps, labels, num_classes=3).device.type == "meta"
    assert ck.cross_level_contrast(maps, maps).device.type == "meta"
    with pytest.raises(ValueError, match="pass num_classes"):
        ck.pseudo_label_contrast(maps, labels)


def test_second_derivatives_dense_path_exact_and_chunked_path_refused_by_name():
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 1, 2])
    x = torch.randn(5, 3, dtype=torch.float64, generator=g)
    tau = torch.tensor(0.3, dtype=torch.float64)

    def penalty(backend, rows, temperature):
        loss = ck.info_nce(rows, labels=labels, temperature=temperature, backend=backend)
        (grad,) = torch.autograd.grad(loss, rows, create_graph=True)
        return grad.square().sum()

    # A gradient penalty through the dense path's fused normalisation equals the reference's.
    leaves = {b: (x.clone().requires_grad_(True), tau.clone().requires_grad_(True)) for b in ("dense", "reference")}
    grads = {b: torch.autograd.grad(penalty(b, *leaves[b]), leaves[b]) for b in leaves}
    for got, want in zip(grads["dense"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(lambda r, t: penalty("dense", r, t), leaves["dense"])
    rows = x.clone().requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backend='dense'"):
        penalty("torch", rows, 0.3).backward()


def test_plain_turns_tensor_subclasses_into_tensors_on_the_same_data_and_graph():
    from contrastkit._validation import plain

    class Tagged(torch.Tensor):
        pass

    leaf = torch.arange(3.0).as_subclass(Tagged).requires_grad_()
    out = plain(leaf)
    assert type(out) is torch.Tensor and out.data_ptr() == leaf.data_ptr()
    (out * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert torch.equal(leaf.grad, torch.tensor([1.0, 2.0, 3.0]))
    x, p = torch.ones(2), torch.nn.Parameter(torch.ones(2))
    assert plain(x) is x and plain(p) is p and plain(None) is None and plain(3) == 3
