"""The options object and the op inputs: one definition that every backend and op schema follows."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import contrastkit._chunked as chunked
from contrastkit import InfoNCEOptions, info_nce
from contrastkit._backends import BACKEND_TABLE
from contrastkit._options import OpInputs, input_gradients, op_schema, split_op_args

FIELD_VALUES = {
    "denominator": st.sampled_from(["all", "each_positive", "negatives"]),
    "normalize": st.booleans(),
    "ignore_index": st.integers(-1000, 1000),
    "self_key_offset": st.none() | st.integers(0, 10_000),
    "chunk_size": st.none() | st.integers(1, 1 << 20),
    "blocks": st.none() | st.integers(1, 1 << 20),
    "paired": st.booleans(),
    "wide_norms": st.booleans(),
}


def test_every_option_has_a_generator_here():
    # A new field must be added to the round trip below (and so to every backend test).
    assert set(FIELD_VALUES) == {f.name for f in dataclasses.fields(InfoNCEOptions)}


@given(st.fixed_dictionaries(FIELD_VALUES))
def test_options_survive_the_custom_op_boundary(values):
    options = InfoNCEOptions(**values)
    assert InfoNCEOptions.decode(options.encode()) == options


def test_op_schemas_list_the_inputs_once_in_order():
    fields = list(OpInputs._fields)
    for op, before, after in (
        (torch.ops.contrastkit.info_nce_rows_chunked, [], []),
        (torch.ops.contrastkit.info_nce_rows_chunked_backward, ["grad_loss"],
         ["valid", "lse", "need_query", "need_key", "need_temperature"]),
    ):
        names = [a.name for a in op.default._schema.arguments]
        assert names == before + fields + after + ["options"]
    assert op_schema().startswith("(Tensor query, Tensor key, Tensor labels, Tensor key_labels, Tensor? groups, "
                                  "Tensor? key_groups, Tensor temperature, str options)")


def test_split_op_args_and_gradients_by_name():
    args = ("g", *range(7), "x", "y", InfoNCEOptions(denominator="negatives").encode())
    before, inputs, after, options = split_op_args(args, 1)
    assert before == ("g",) and tuple(inputs) == tuple(range(7)) and after == ("x", "y")
    assert options.denominator == "negatives"
    grads = input_gradients(query="dq", temperature="dt")
    assert len(grads) == len(OpInputs._fields) + 1 and grads[0] == "dq" and grads[6] == "dt"
    assert grads[1:6] == (None,) * 5 and grads[-1] is None
    with pytest.raises(TypeError, match="tau"):
        input_gradients(tau=1)


def test_every_backend_takes_inputs_and_options():
    for backend in BACKEND_TABLE.values():
        rows = backend.info_nce_rows
        assert list(inspect.signature(rows).parameters) == ["inputs", "options"], backend.name


def _case(seed=0, n=13, m=17):
    g = torch.Generator().manual_seed(seed)
    return dict(query=torch.randn(n, 5, generator=g, dtype=torch.float64),
                key=torch.randn(m, 5, generator=g, dtype=torch.float64) * 3,
                labels=torch.randint(0, 3, (n,), generator=g), key_labels=torch.randint(-1, 3, (m,), generator=g))


# Each field set away from its default in turn; the loss must change on the reference (the field
# matters) and every backend must follow it.
VARIATIONS = {
    "denominator": dict(denominator="each_positive"),
    "normalize": dict(normalize=False),
    "ignore_index": dict(ignore_index=2),
    "self_key_offset": dict(self_key_offset=3),
}


@pytest.mark.parametrize("field", list(VARIATIONS))
def test_every_option_reaches_every_backend(field):
    # chunk_size is the torch backend's alone (tested below); blocks and paired are structure
    # that info_nce derives from its arguments, and wide_norms the dense paired blocks' alone, set by
    # info_nce for a call whose loss it tests (tests/test_dense.py).
    assert set(VARIATIONS) | {"chunk_size", "blocks", "paired", "wide_norms"} == {
        f.name for f in dataclasses.fields(InfoNCEOptions)}
    case = _case()
    case["key"][3:16] = case["query"]  # keys 3.. are the queries, as self_key_offset=3 says
    case["key_labels"][3:16] = case["labels"]
    base = info_nce(**case, reduction="none", backend="reference")
    varied = info_nce(**case, **VARIATIONS[field], reduction="none", backend="reference")
    assert not torch.allclose(base, varied), f"{field} does not change the reference"
    for backend in ("dense", "torch", "triton"):
        if backend == "triton":
            pytest.importorskip("triton")
            from contrastkit.kernels import available

            if not available():
                continue
            got = info_nce(**{k: v.float() if v.is_floating_point() else v for k, v in case.items()},
                           **VARIATIONS[field], reduction="none", backend="triton")
            torch.testing.assert_close(got.double(), varied, rtol=1e-4, atol=1e-4)
        else:
            torch.testing.assert_close(info_nce(**case, **VARIATIONS[field], reduction="none", backend=backend),
                                       varied)


def test_chunk_size_reaches_the_torch_backend(monkeypatch):
    blocks = []
    original = chunked._block
    monkeypatch.setattr(chunked, "_block", lambda *a: blocks.append(a[-2]) or original(*a))
    case = _case()
    want = info_nce(**case, backend="reference")
    torch.testing.assert_close(info_nce(**case, backend="torch", chunk_size=4), want)
    assert blocks == [0, 4, 8, 12]
