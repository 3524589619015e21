"""The value-check switch: defaults by device, the environment variable, the setter, and that
every entry point's value checks follow it."""

from __future__ import annotations

import pytest
import torch

import contrastkit as ck
from contrastkit import _validation as v
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


@pytest.mark.parametrize("layout", ["maps", "rows"])
@pytest.mark.parametrize("side", ["query", "key"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_paired_blocks_are_checked_through_their_loss(layout, side, bad, reduction):
    """Paired views in blocks (cross-level contrast's call) are value-checked on their loss, not by a pass
    over the embeddings: a non-finite entry anywhere still names its argument, and huge finite
    embeddings (whose sums overflow) pass with a finite loss."""
    g = torch.Generator().manual_seed(hash((layout, side, reduction)) % 2**31)
    shape = (3, 5, 2, 4) if layout == "maps" else (24, 5)
    q, k = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    where = tuple(int(torch.randint(0, s, (), generator=g)) for s in shape)
    (q if side == "query" else k)[where] = bad
    with ck.value_checks(True), v.embedding_names("global_map", "local_map"):
        with pytest.raises(ValueError, match=f"^{'global_map' if side == 'query' else 'local_map'} contains NaN"):
            ck.info_nce(q, k, groups=3, reduction=reduction)
        huge = torch.randn(shape, generator=g).sign() * 3e38
        loss = ck.info_nce(huge, huge.flip(0), groups=3, reduction=reduction)
        assert torch.isfinite(loss).all()
        torch.testing.assert_close(loss, ck.info_nce(huge.double(), huge.flip(0).double(), groups=3,
                                                     reduction=reduction, backend="reference").float())


def test_paired_blocks_check_temperature_and_weights_by_name():
    q, k = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    with ck.value_checks(True):
        for tau in (torch.tensor(0.0), torch.tensor(-0.5), torch.tensor(float("nan"))):
            with pytest.raises(ValueError, match="temperature must be positive and finite"):
                ck.info_nce(q, k, groups=4, temperature=tau)
        with pytest.raises(ValueError, match="weights must be finite and non-negative"):
            ck.info_nce(q, k, groups=4, weights=torch.tensor([1.0, float("nan")] * 8))
        with pytest.raises(ValueError, match="weights must be finite and non-negative"):
            ck.info_nce(q, k, groups=4, weights=-torch.ones(16))


def test_a_settings_check_is_remembered_once_it_passes_and_only_then():
    calls = []

    @v.settings_check
    def check(flag, choice):
        calls.append((flag, choice))
        v.check_flag("flag", flag)
        v.check_choice("choice", choice, ("a", "b"))

    check(True, "a")
    check(True, "a")
    assert calls == [(True, "a")]
    check(False, "a")
    assert len(calls) == 2
    for _ in range(2):  # a failing check is not remembered: it raises every time
        with pytest.raises(TypeError, match="flag must be a bool"):
            check(1, "a")  # 1 == True, but a check remembered for True does not pass 1
        with pytest.raises(ValueError, match="choice must be one of"):
            check(True, "c")
    assert len(calls) == 2 + 2 * (2 + 1)  # a TypeError is raised again by a direct call
    check(True, "".join(["a"]))  # an equal string: remembered
    assert len(calls) == 8
    check(True, choice="b")  # keyword calls (module construction) are checked, not remembered
    check(True, choice="b")
    assert len(calls) == 10

    @v.settings_check
    def grid(size):
        calls.append(size)
        return tuple(size)

    assert grid([2, 3]) == (2, 3) and grid([2, 3]) == (2, 3)  # unhashable: checked every time
    assert calls[-2:] == [[2, 3], [2, 3]]


def test_embedding_names_as_block_and_decorator_restore_the_names():
    from contrastkit._validation import current_embedding_names

    assert current_embedding_names() == ("query", "key")
    with v.embedding_names("a", "b"):
        with v.embedding_names("c", "d"):
            assert current_embedding_names() == ("c", "d")
        assert current_embedding_names() == ("a", "b")
        with pytest.raises(RuntimeError), v.embedding_names("e", "f"):
            raise RuntimeError
        assert current_embedding_names() == ("a", "b")
    assert current_embedding_names() == ("query", "key")

    @v.embedding_names("outer_q", "outer_k")
    def named(depth):
        seen = current_embedding_names()
        inner = named(depth - 1) if depth else None
        assert current_embedding_names() == seen
        return seen, inner

    assert named(2) == (("outer_q", "outer_k"), (("outer_q", "outer_k"), (("outer_q", "outer_k"), None)))
    assert current_embedding_names() == ("query", "key")
