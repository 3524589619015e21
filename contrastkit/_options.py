"""The core op's settings as one object, and its tensor inputs as one tuple, for every backend.

``info_nce`` checks its arguments once and builds an :class:`InfoNCEOptions` (the static
settings) and an :class:`OpInputs` (the tensors). Every backend takes exactly these two:
the dense reference, the lean dense path, the chunked torch path and the Triton backend (which
unpacks them into the kernels' own tensors-and-flags API, ``contrastkit/_triton.py``). The
chunked path's ``torch.library`` custom ops cannot take a Python object, so at that boundary the
options travel as one string (:meth:`InfoNCEOptions.encode`, read back by
:meth:`InfoNCEOptions.decode`) and the op schemas are written from the fields of
:class:`OpInputs` (:func:`op_schema`): adding an option or an input is one edit here, not one per
signature.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import NamedTuple

import torch

SHARED = -1
"""Group id of a key (or query) that belongs to every group: a candidate of every query.

Use it for keys that are not tied to one image, e.g. a memory queue's keys next to per-image
negatives: ``key_groups = torch.cat([image_ids, torch.full((len(queue),), SHARED)])``.
"""


@dataclasses.dataclass(frozen=True)
class InfoNCEOptions:
    """Every static setting of the masked InfoNCE (see :func:`contrastkit.info_nce`)."""

    denominator: str = "all"
    normalize: bool = True
    ignore_index: int = -1
    self_key_offset: int | None = None
    chunk_size: int | None = None  # the torch backend's query rows per block; None: about 1M logits a block
    # Structure known without reading values (no device sync), for the dense path:
    blocks: int | None = None  # the groups are this many equal, contiguous blocks of queries and of keys
    paired: bool = False  # labels=None with a key: key i is the one positive of query i
    # Sums of squares for the L2 norms in float64 (rows of any finite norm). False, on the dense path's
    # paired blocks only: in the compute dtype, a row that overflows it making the loss NaN; info_nce
    # asks for that only when it tests the loss and recomputes such a call wide.
    wide_norms: bool = True

    def encode(self) -> str:
        """One string for a custom op's schema (which cannot take a Python object)."""
        return ";".join(f"{field.name}={getattr(self, field.name)!r}" for field in dataclasses.fields(self))

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(text: str) -> InfoNCEOptions:
        values = {}
        for item in text.split(";"):
            name, _, value = item.partition("=")
            values[name] = _literal(value)
        return InfoNCEOptions(**values)


def _literal(text: str):
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    if text[:1] in "'\"":
        return text[1:-1]
    return int(text)


class OpInputs(NamedTuple):
    """The tensors of one core op call. Labels are given by then, except for paired views on the
    dense path (``InfoNCEOptions.paired``), which needs no ids; every other backend gets 0..N-1."""

    query: torch.Tensor  # (N, D) rows or a (B, C, H, W) map
    key: torch.Tensor  # (M, D) or a map; the query itself in self-contrast
    labels: torch.Tensor  # (N,) int64 (None: paired views on the dense path)
    key_labels: torch.Tensor  # (M,) int64 (None: as labels)
    groups: torch.Tensor | None  # (N,) int64 or None
    key_groups: torch.Tensor | None  # (M,) int64 or None
    temperature: torch.Tensor  # 0-dim, in the compute dtype; may require grad


_SCHEMA_TYPES = {torch.Tensor: "Tensor", torch.Tensor | None: "Tensor?"}


def op_schema(before: str = "", after: str = "", returns: str = "(Tensor, Tensor)") -> str:
    """A custom op schema: ``before`` arguments, the :class:`OpInputs`, ``after`` arguments, the
    options string. ``before`` / ``after`` are schema fragments such as ``"Tensor grad_loss"``."""
    hints = typing.get_type_hints(OpInputs)
    inputs = ", ".join(f"{_SCHEMA_TYPES[hints[name]]} {name}" for name in OpInputs._fields)
    args = ", ".join(part for part in (before, inputs, after, "str options") if part)
    return f"({args}) -> {returns}"


def split_op_args(args: tuple, before: int = 0) -> tuple[tuple, OpInputs, tuple, InfoNCEOptions]:
    """The positional arguments of an op built by :func:`op_schema`, as (before, inputs, after, options)."""
    size = len(OpInputs._fields)
    inputs = OpInputs(*args[before : before + size])
    return args[:before], inputs, args[before + size : -1], InfoNCEOptions.decode(args[-1])


def input_gradients(**gradients: torch.Tensor | None) -> tuple:
    """An op's backward result by name: one entry per :class:`OpInputs` field, then the options."""
    unknown = set(gradients) - set(OpInputs._fields)
    if unknown:
        raise TypeError(f"no op input is called {sorted(unknown)}")
    return (*(gradients.get(name) for name in OpInputs._fields), None)
