"""The op budget of the losses: device ops and host syncs per call, read from a CPU profile (no GPU needed).

    python -m benchmarks.op_budget                 # the table
    python -m benchmarks.op_budget --write         # and benchmarks/results/op-budget.{md,json}
    python -m benchmarks.op_budget --check         # exit 1 when a count is over its budget

A call is one forward and backward of a loss, inputs requiring grad, profiled with ``torch.profiler``
on the CPU. :func:`count_ops` counts, per call:

- **device ops**: what a GPU would launch a kernel for. The ops counted are the *top-level* aten ops
  of each thread (no aten op above them: called from Python, from a custom op's Python body or by
  the autograd engine in the backward), with two refinements read from the dispatcher:

  * an op that is ``CompositeImplicitAutograd`` (``reshape``, ``flatten``, ``to``, ``contiguous``,
    ``linear``, ``matmul``, ``einsum``, ``cross_entropy``, ``item`` ...) runs exactly the ops below
    it, on every device; it counts as those (``reshape`` that only views counts 0, one that copies
    counts the copy; ``to`` to the same dtype counts 0);
  * views (every overload returns an alias of an input: ``view``, ``permute``, ``transpose``,
    ``expand``, ``slice``, ``select``, ``squeeze``, ``detach``, ``alias``, ``split``, ...) and
    ``_unsafe_view``, metadata ops (no tensor returned: ``size``, ``is_nonzero``, ...) and bare
    allocations (``empty``, ``empty_like``, ``empty_strided``, ``new_empty``, ``resize_``) count 0.
    Allocations that fill (``zeros``, ``ones``, ``full``, ``*_like``, ``arange``) are kernels and count.

  Every other top-level op counts one, whatever it runs below (``mean``, ``index``, ``clone`` are
  one op each). Ops of any other namespace (``contrastkit::`` custom ops) are not kernels
  themselves; the aten ops their bodies call are top-level and count.
- **host syncs**: anywhere in the tree, not only at the top: ``_local_scalar_dense`` (``.item()``,
  ``bool(tensor)``, ``int(tensor)``), ``nonzero`` (also inside boolean-mask indexing and
  ``index_put_``), ``masked_select``, ``equal``, the ``unique`` family, and ``Tensor.tolist`` (seen
  from Python: the profiler records no op for it). A sync op inside another sync op counts once.
  ``repeat_interleave`` with a tensor of repeats and no ``output_size`` reads the total through
  ``.item()`` on every device, so its syncs are the ``_local_scalar_dense`` below it (two: the
  total and the check that no repeat is negative); with ``output_size`` or an int it has none.
- **Triton kernels**: every launch of a ``@triton.jit`` function (``JITFunction.run`` and the
  interpreter's ``InterpretedFunction.run`` are replaced, for the call, by a recorder that runs
  nothing): the launchers' host code runs on CPU tensors; the kernels' outputs stay unwritten.

Blind spots: a CPU profile does not see host-to-device copies made by ``torch.tensor(data,
device=...)``, nor the syncs of ``.cpu()`` / ``.numpy()`` on a device tensor.

**As on a GPU.** :func:`gpu_dispatch` makes ``backend="auto"`` choose for CPU tensors what it chooses
for CUDA ones (the dense path up to ``DENSE_MAX_LOGITS["cuda"]`` logits, the Triton kernels above it
where they take the dtype and size), and turns the value checks off (their default on CUDA). The
kernels run nowhere (see above); ``TRITON_INTERPRET=1`` is set for the call so that their device
check lets CPU tensors through, which also gives the launchers the interpreter's tile shapes (the
host ops do not depend on them).

Each case is counted three ways: ``cpu`` (``auto`` on the CPU, value checks on: the CPU default),
``cpu_nochecks`` (the same, value checks off) and ``gpu`` (:func:`gpu_dispatch`). ``BUDGETS`` holds
the most device ops and syncs each may take: the project's target where it is met, else today's
count (a guard against regressions) with the target in ``TARGETS``, so the table shows what is met.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# ----------------------------------------------------------------------------- counting


@dataclasses.dataclass(frozen=True)
class OpCount:
    """What one call of a function costs: device ops, host syncs, Triton kernel launches, and by name."""

    ops: int
    syncs: int
    kernels: int
    names: collections.Counter  # device ops by aten name
    sync_names: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    kernel_names: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    backends: tuple[str, ...] = ()  # the backends the call's fused operations ran on, in first-use order

    def top(self, k: int = 8) -> str:
        """The ``k`` most frequent device ops, "name ×count" (without the ``aten::``)."""
        return ", ".join(f"{name.removeprefix('aten::')} ×{n}" for name, n in self.names.most_common(k))


# Ops that return an alias but are not in every overload's schema as one, or change only metadata in place.
_NO_KERNEL_EXTRA = frozenset({
    "aten::_unsafe_view", "aten::as_strided_", "aten::squeeze_", "aten::unsqueeze_", "aten::transpose_",
    "aten::t_", "aten::swapaxes_", "aten::swapdims_", "aten::detach_", "aten::requires_grad_", "aten::set_",
    "aten::retain_grad",
    # bare allocations
    "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided",
    "aten::empty_permuted", "aten::resize_", "aten::resize_as_",
})
# Host syncs: the op waits for the device (reads a value or a data-dependent size).
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select", "aten::equal",
    "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::unique_dim_consecutive",
})
PYTHON_SYNC = "Tensor.tolist"  # the name the one sync seen from Python is recorded under


def _returns_tensor(ret) -> bool:
    return "Tensor" in str(ret.type)


@functools.cache
def op_kind(name: str) -> str:
    """How :func:`count_ops` counts an op: ``"composite"`` (as the ops below it), ``"mixed"`` (some
    overloads composite: as the ops below it, or one op where none below counts), ``"none"`` (a view, a bare
    allocation, metadata: no kernel), ``"op"`` (one kernel), ``"other"`` (not an aten op)."""
    if not name.startswith("aten::"):
        return "other"
    if name in _NO_KERNEL_EXTRA:
        return "none"
    if name == "aten::equal":  # a kernel, then a sync reading its result
        return "op"
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return "op"
    implicit, views, tensors = [], [], []
    for overload in packet.overloads():
        op = getattr(packet, overload)
        schema = op._schema
        if any(arg.alias_info is not None and arg.alias_info.is_write and arg.kwarg_only for arg in schema.arguments):
            continue  # an out= variant
        try:
            implicit.append(torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CompositeImplicitAutograd"))
        except RuntimeError:  # an overload only TorchScript knows
            continue
        returned = [r for r in schema.returns if _returns_tensor(r)]
        tensors.append(bool(returned))
        views.append(bool(returned) and all(r.alias_info is not None and not r.alias_info.is_write
                                            for r in returned))
    if not implicit:
        return "op"
    if all(implicit):
        return "composite"
    if all(views) or (not any(tensors) and not name.endswith("_")):
        return "none"
    return "mixed" if any(implicit) else "op"


def _aten_children(event) -> list:
    return [c for c in event.cpu_children if c.name.startswith("aten::")]


def _device_ops(event) -> list[str]:
    """The kernels one top-level event stands for, by name."""
    kind = op_kind(event.name)
    if kind == "none":
        return []
    if kind in ("composite", "mixed"):
        below = [name for child in _aten_children(event) for name in _device_ops(child)]
        if below or kind == "composite":
            return below
    return [event.name]


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _has_sync_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in SYNC_OPS:
            return True
        parent = parent.cpu_parent
    return False


def count_events(events, python_syncs: collections.Counter | None = None) -> OpCount:
    """:class:`OpCount` of a profile's events (``prof.events()``), kernel launches not included."""
    names, syncs = collections.Counter(), collections.Counter(python_syncs or {})
    for event in events:
        if event.name in SYNC_OPS and not _has_sync_ancestor(event):
            syncs[event.name] += 1
        if event.name.startswith("aten::") and not _has_aten_ancestor(event):
            names.update(_device_ops(event))
    return OpCount(sum(names.values()), sum(syncs.values()), 0, names, syncs)


@contextlib.contextmanager
def record_kernels():
    """Every Triton kernel launched inside the block is recorded (a Counter of kernel names), not run."""
    launched = collections.Counter()
    try:
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit
    except ImportError:  # no triton: nothing can launch
        yield launched
        return

    def record(self, *args, grid, warmup, **kwargs):
        if not warmup:
            launched[getattr(self, "__name__", None) or self.fn.__name__] += 1

    saved = jit.JITFunction.run, interpreter.InterpretedFunction.run
    jit.JITFunction.run = interpreter.InterpretedFunction.run = record
    try:
        yield launched
    finally:
        jit.JITFunction.run, interpreter.InterpretedFunction.run = saved


@contextlib.contextmanager
def _record_tolist(syncs: collections.Counter):
    tolist = torch.Tensor.tolist

    def recorded(self):
        syncs[PYTHON_SYNC] += 1
        return tolist(self)

    torch.Tensor.tolist = recorded
    try:
        yield
    finally:
        torch.Tensor.tolist = tolist


@contextlib.contextmanager
def record_backends():
    """The backends (``contrastkit._backends.BACKEND_TABLE``) that the block's fused operations run
    on, in first-use order (a list filled as they run)."""
    from contrastkit import _backends

    used: list[str] = []

    def wrap(name, fn):
        def run(*args, **kwargs):
            if name not in used:
                used.append(name)
            return fn(*args, **kwargs)
        return run

    saved = dict(_backends.BACKEND_TABLE)
    for key, b in saved.items():
        _backends.BACKEND_TABLE[key] = b._replace(info_nce_rows=wrap(b.name, b.info_nce_rows),
                                                  pool_patches=wrap(f"{b.name} pool", b.pool_patches))
    try:
        yield used
    finally:
        _backends.BACKEND_TABLE.update(saved)


def count_ops(fn: Callable[[], object], warmup: bool = True) -> OpCount:
    """Device ops, host syncs and Triton kernel launches of one call of ``fn`` (a forward and
    backward, see the module docstring for what counts). ``warmup`` calls ``fn`` once unprofiled
    first, so one-time work (lazy imports, caches) stays out of the count; ``fn`` must leave nothing
    behind that changes its next call (set ``.grad`` to None, or use ``torch.autograd.grad``)."""
    with record_kernels(), record_backends():
        if warmup:
            fn()
    python_syncs = collections.Counter()
    with record_kernels() as kernels, record_backends() as backends, _record_tolist(python_syncs):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            fn()
    counted = count_events(prof.events(), python_syncs)
    return dataclasses.replace(counted, kernels=sum(kernels.values()), kernel_names=kernels,
                               backends=tuple(backends))
