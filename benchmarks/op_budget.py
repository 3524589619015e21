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


# ----------------------------------------------------------------------------- the GPU's dispatch


@contextlib.contextmanager
def gpu_dispatch():
    """Within the block, calls on CPU tensors take the path they would take on CUDA tensors of the
    same dtype: value checks off, ``auto`` dense up to ``DENSE_MAX_LOGITS["cuda"]`` logits and the
    Triton kernels above it (where they take the dtype and size), ``pool_patches`` on the kernels.
    Launches still need :func:`record_kernels` (``count_ops`` installs it)."""
    import importlib
    import os

    import contrastkit
    from contrastkit import _backends

    # The kernels are decorated when their modules are first imported, as TRITON_INTERPRET then
    # says: import them before it changes, so the block leaves them as the process had them.
    kernels = importlib.import_module("contrastkit.kernels")
    for module in ("contrastkit.kernels.info_nce", "contrastkit.kernels.pool"):
        importlib.import_module(module)

    def supports(operation: str, x: torch.Tensor, size: int) -> bool:
        if operation == "info_nce":
            return kernels.supports(x.dtype, size)
        return x.dtype in kernels.KERNEL_DTYPES

    saved_limit, saved_triton = _backends.dense_max_logits, _backends.BACKEND_TABLE["triton"]
    saved_env = os.environ.get("TRITON_INTERPRET")
    _backends.dense_max_logits = lambda device, blocked=False: saved_limit(torch.device("cuda"), blocked)
    _backends.BACKEND_TABLE["triton"] = saved_triton._replace(supports=supports)
    os.environ["TRITON_INTERPRET"] = "1"  # the launchers' device check lets CPU tensors through
    try:
        with contrastkit.value_checks(False):
            yield
    finally:
        _backends.dense_max_logits, _backends.BACKEND_TABLE["triton"] = saved_limit, saved_triton
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


# ----------------------------------------------------------------------------- cases

PATHS = {
    "cpu": "auto on the CPU, value checks on (the CPU default)",
    "cpu_nochecks": "auto on the CPU, value checks off",
    "gpu": "auto as on a GPU (value checks off, CUDA's dense limit, Triton above it; kernels recorded, not run)",
}


def path_context(path: str):
    import contrastkit

    if path == "cpu":
        return contrastkit.value_checks(True)
    if path == "cpu_nochecks":
        return contrastkit.value_checks(False)
    if path == "gpu":
        return gpu_dispatch()
    raise ValueError(f"unknown path {path!r}; one of {list(PATHS)}")


def training_step(loss_fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, module=None) -> Callable[[], None]:
    """One forward and backward of ``loss_fn(*inputs)``, the gradients of the inputs that require grad
    and of the module's parameters cleared first (as ``zero_grad(set_to_none=True)`` does)."""
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    if module is not None:
        leaves += list(module.parameters())

    def step():
        for leaf in leaves:
            leaf.grad = None
        loss_fn(*inputs).backward()

    return step


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    what: str
    make: Callable[..., Callable[[], None]]  # builds the inputs, returns one training step
    budgeted: bool = True  # False: a comparison row (a peer's form), no budget
    fast: dict = dataclasses.field(default_factory=dict)  # make's arguments for CI: the same counts, sooner


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).requires_grad_(True)


def _randint(high, *shape, seed=1):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


def _cross_level(batch: int):
    def make():
        from contrastkit import CrossLevelContrast

        loss = CrossLevelContrast()
        return training_step(loss, _randn(batch, 128, 5, 5), _randn(batch, 128, 5, 5, seed=1), module=loss)
    return make


def _patch_nce_seed():
    from benchmarks.seeds import patch_nce

    return training_step(patch_nce, _randn(8, 128, 5, 5), _randn(8 * 25, 128, seed=1))


def _cross_level_eager():
    from benchmarks.seeds import cross_level_eager

    return training_step(cross_level_eager, _randn(8, 128, 5, 5), _randn(8, 128, 5, 5, seed=1))


def _supcon8(dim: int = 128):
    from contrastkit import info_nce

    return training_step(lambda z, y: info_nce(z, labels=y), _randn(SUPCON_N, dim), _randint(8, SUPCON_N))


def _pseudo_label(mode: str, **options):
    def make():
        from contrastkit import PseudoLabelContrast

        loss = PseudoLabelContrast(mode=mode, num_classes=4, **options)
        return training_step(lambda e, y: loss(e, y, generator=torch.Generator().manual_seed(0)),
                             _randn(8, 32, 64, 64), _randint(4, 8, 64, 64), module=loss)
    return make


def _ntxent():
    from contrastkit import NTXentLoss

    loss = NTXentLoss()
    return training_step(loss, _randn(32, 128), _randn(32, 128, seed=1), module=loss)


def _supcon_module():
    from contrastkit import SupConLoss

    loss = SupConLoss()
    return training_step(loss, _randn(32, 128), _randint(8, 32), module=loss)


def _global_contrast():
    from contrastkit import GlobalContrast

    volumes, partitions = 4, 4
    slices = volumes * partitions
    volume = torch.arange(volumes).repeat_interleave(partitions).repeat(2)
    partition = torch.arange(partitions).repeat(volumes).repeat(2)
    view = torch.arange(2).repeat_interleave(slices)
    loss = GlobalContrast()
    return training_step(loss, _randn(2 * slices, 128), volume, partition, view, module=loss)


def _local_contrast():
    from contrastkit import LocalContrast

    loss = LocalContrast()
    return training_step(loss, _randn(8, 64, 32, 32), _randn(8, 64, 32, 32, seed=1), module=loss)


def _patch_nce():
    from contrastkit import PatchNCELoss

    loss = PatchNCELoss(num_patches=256)
    return training_step(lambda q, k: loss(q, k, generator=torch.Generator().manual_seed(0)),
                         _randn(4, 64, 32, 32), _randn(4, 64, 32, 32, seed=1), module=loss)


SUPCON_N = 8192
CASES = {case.name: case for case in (
    Case("cross_level_b8", "CrossLevelContrast(), global and local maps (8, 128, 5, 5): CLCC's protocol",
         _cross_level(8)),
    Case("cross_level_b24", "CrossLevelContrast(), maps (24, 128, 5, 5)", _cross_level(24)),
    Case("cross_level_seed", "benchmarks/seeds.py patch_nce: CLCC's eager PatchNCE form, (8, 128, 5, 5)",
         _patch_nce_seed, budgeted=False),
    Case("cross_level_eager", "benchmarks/seeds.py cross_level_eager: one batched product, (8, 128, 5, 5)",
         _cross_level_eager, budgeted=False),
    # The chunked CPU path runs one block of queries per 2^20 logits, so its count grows with N; no
    # path's count depends on D, which CI lowers to 16 to spend less time in the arithmetic.
    Case("supcon8", f"info_nce(z, labels=y): SupCon self-contrast, N = {SUPCON_N:,}, D = 128, 8 classes", _supcon8,
         fast=dict(dim=16)),
    Case("pl_pixel", "PseudoLabelContrast(mode='pixel', anchors_per_class=128, num_classes=4), (8, 32, 64, 64)",
         _pseudo_label("pixel", anchors_per_class=128)),
    Case("pl_prototype", "PseudoLabelContrast(mode='prototype', num_classes=4), (8, 32, 64, 64)",
         _pseudo_label("prototype")),
    Case("ntxent", "NTXentLoss(), two views (32, 128)", _ntxent),
    Case("supcon", "SupConLoss(), (32, 128), 8 classes", _supcon_module),
    Case("global_gd", "GlobalContrast() (GD), 4 volumes x 4 partitions x 2 views, D = 128", _global_contrast),
    Case("local", "LocalContrast(), maps (8, 64, 32, 32), 4 x 4 regions", _local_contrast),
    Case("patch_nce", "PatchNCELoss(num_patches=256), maps (4, 64, 32, 32)", _patch_nce),
)}


def measure(case: str, paths=tuple(PATHS), warmup: bool = True, fast: bool = False) -> dict[str, OpCount]:
    """The counts of one case on each path (the inputs built once); ``fast``: at the case's CI sizes."""
    step = CASES[case].make(**(CASES[case].fast if fast else {}))
    out = {}
    for path in paths:
        with path_context(path):
            out[path] = count_ops(step, warmup=warmup)
    return out


# ----------------------------------------------------------------------------- budgets

# (device ops, syncs) per case and path. None: no target on that count. The project's targets:
TARGETS = {
    "cross_level_b8": {"cpu": (40, None), "cpu_nochecks": (40, 0), "gpu": (40, 0)},
    "cross_level_b24": {"cpu": (40, None), "cpu_nochecks": (40, 0), "gpu": (40, 0)},
    "pl_pixel": {"cpu_nochecks": (None, 0), "gpu": (None, 0)},
    "pl_prototype": {"cpu_nochecks": (None, 0), "gpu": (None, 0)},
    "supcon8": {"gpu": (40, 0)},  # device ops beside the kernels
}
# The most (device ops, syncs) allowed: the target where it is met, else the count measured when the
# budget was set (a guard against regressions; lower it as the paths get leaner).
BUDGETS = {
    "cross_level_b8": {"cpu": (29, 1), "cpu_nochecks": (31, 0), "gpu": (31, 0)},
    "cross_level_b24": {"cpu": (29, 1), "cpu_nochecks": (31, 0), "gpu": (31, 0)},
    "supcon8": {"cpu": (5782, 1), "cpu_nochecks": (5773, 0), "gpu": (40, 0)},
    "pl_pixel": {"cpu": (1031, 2), "cpu_nochecks": (1009, 0), "gpu": (68, 0)},
    "pl_prototype": {"cpu": (125, 2), "cpu_nochecks": (97, 0), "gpu": (97, 0)},
    "ntxent": {"cpu": (101, 1), "cpu_nochecks": (88, 0), "gpu": (88, 0)},
    "supcon": {"cpu": (98, 1), "cpu_nochecks": (85, 0), "gpu": (85, 0)},
    "global_gd": {"cpu": (121, 4), "cpu_nochecks": (102, 0), "gpu": (102, 0)},
    "local": {"cpu": (92, 1), "cpu_nochecks": (83, 0), "gpu": (81, 0)},
    "patch_nce": {"cpu": (37, 1), "cpu_nochecks": (39, 0), "gpu": (39, 0)},
}


def budget_of(case: str, path: str) -> tuple[int, int] | None:
    return BUDGETS.get(case, {}).get(path)


def target_of(case: str, path: str) -> tuple[int | None, int | None] | None:
    return TARGETS.get(case, {}).get(path)


def _within(count: OpCount, limit) -> bool:
    ops, syncs = limit
    return (ops is None or count.ops <= ops) and (syncs is None or count.syncs <= syncs)


def status(case: str, path: str, count: OpCount) -> str:
    budget, target = budget_of(case, path), target_of(case, path)
    if not CASES[case].budgeted:
        return "comparison"
    if budget is None:
        return "no budget"
    if not _within(count, budget):
        return "OVER BUDGET"
    if target is None:
        return "within budget"
    return "target met" if _within(count, target) else "target not met"


def over_budget(results: dict[str, dict[str, OpCount]]) -> list[str]:
    """Every count above its budget, as a sentence (empty when all are within)."""
    problems = []
    for case, paths in results.items():
        for path, count in paths.items():
            budget = budget_of(case, path)
            if CASES[case].budgeted and budget is None:
                problems.append(f"{case} {path}: no budget")
            elif budget is not None and not _within(count, budget):
                problems.append(f"{case} {path}: {count.ops} device ops, {count.syncs} syncs > budget "
                                f"{budget[0]} ops, {budget[1]} syncs")
    return problems


# ----------------------------------------------------------------------------- outputs


def _pair(limit) -> str:
    if limit is None:
        return "–"
    return " / ".join("–" if x is None else str(x) for x in limit)


def table(results: dict[str, dict[str, OpCount]]) -> str:
    lines = ["| case | path | auto's backend | device ops | syncs | Triton kernels | budget (ops / syncs) "
             "| target (ops / syncs) | status |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    for case, paths in results.items():
        for path, c in paths.items():
            backends = ", ".join(c.backends) or "(eager)"
            lines.append(f"| {case} | {path} | {backends} | {c.ops} | {c.syncs} | {c.kernels} "
                         f"| {_pair(budget_of(case, path))} | {_pair(target_of(case, path))} "
                         f"| {status(case, path, c)} |")
    return "\n".join(lines)


def breakdown(results: dict[str, dict[str, OpCount]], top: int = 8) -> str:
    lines = ["| case | path | most frequent device ops | syncs by op | Triton kernels |", "|---|---|---|---|---|"]
    for case, paths in results.items():
        for path, c in paths.items():
            syncs = ", ".join(f"{k.removeprefix('aten::')} ×{n}" for k, n in c.sync_names.most_common()) or "–"
            kernels = ", ".join(f"{k} ×{n}" for k, n in c.kernel_names.most_common()) or "–"
            lines.append(f"| {case} | {path} | {c.top(top)} | {syncs} | {kernels} |")
    return "\n".join(lines)


def facts() -> dict:
    import datetime as dt
    import subprocess

    from benchmarks.harness import ROOT
    from benchmarks.report import cpu_model, git_commit, versions

    try:
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                 text=True, cwd=ROOT, check=True).stdout.split("\n")
        changed = sorted(line[3:] for line in changed if line.strip())
    except (OSError, subprocess.CalledProcessError):
        changed = []
    return dict(device=cpu_model(), date=dt.date.today().isoformat(), commit=git_commit(),
                uncommitted_changes=changed, versions=versions(), torch_threads=torch.get_num_threads())


def target_summary(results: dict[str, dict[str, OpCount]]) -> tuple[list[str], list[str]]:
    """(met, not met): each measured count that has a target, as "case path: measured vs target"."""
    met, missed = [], []
    for case, paths in results.items():
        for path, count in paths.items():
            target = target_of(case, path)
            if target is None:
                continue
            for name, value, limit in (("ops", count.ops, target[0]), ("syncs", count.syncs, target[1])):
                if limit is not None:
                    (met if value <= limit else missed).append(f"{case} {path}: {value} {name} (target {limit})")
    return met, missed


def markdown(results: dict[str, dict[str, OpCount]], run: dict) -> str:
    changed = (f" (uncommitted changes in {', '.join(run['uncommitted_changes'])})"
               if run["uncommitted_changes"] else "")
    out = ["# Op budget: device ops and host syncs per forward + backward", "",
           f"- {run['device']}, {run['date']}, torch {run['versions']['torch']}, "
           f"triton {run['versions'].get('triton')}",
           f"- commit {run['commit']}{changed}",
           "- `python -m benchmarks.op_budget --write`; what counts: the docstring of `benchmarks/op_budget.py`", "",
           "Paths: " + "; ".join(f"`{name}` {what}" for name, what in PATHS.items()) + ".", "",
           "| case | what |", "|---|---|"]
    out += [f"| {case} | {CASES[case].what} |" for case in results]
    met, missed = target_summary(results)
    out += ["", f"Targets met: {'; '.join(met) or 'none'}.", "", f"Targets not met: {'; '.join(missed) or 'none'}."]
    out += ["", table(results), "", "## What the counts are made of", "", breakdown(results), ""]
    return "\n".join(out)


def to_json(results: dict[str, dict[str, OpCount]], run: dict) -> dict:
    rows = []
    for case, paths in results.items():
        for path, c in paths.items():
            rows.append(dict(case=case, path=path, backends=list(c.backends), device_ops=c.ops, syncs=c.syncs,
                             kernels=c.kernels, budget=budget_of(case, path), target=target_of(case, path),
                             status=status(case, path, c), ops_by_name=dict(c.names.most_common()),
                             syncs_by_name=dict(c.sync_names.most_common()),
                             kernels_by_name=dict(c.kernel_names.most_common())))
    return dict(run=run, paths=PATHS, cases={case: CASES[case].what for case in results}, rows=rows)


def main(argv=None) -> int:
    import argparse
    import json
    import sys
    from pathlib import Path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--paths", nargs="+", choices=list(PATHS), default=list(PATHS))
    parser.add_argument("--write", action="store_true", help="write benchmarks/results/op-budget.md and .json")
    parser.add_argument("--check", action="store_true", help="exit 1 when a count is over its budget")
    args = parser.parse_args(argv)
    results = {}
    for case in args.cases:
        results[case] = measure(case, args.paths)
        print(f"{case}: " + ", ".join(f"{path} {c.ops} ops {c.syncs} syncs {c.kernels} kernels"
                                      for path, c in results[case].items()), file=sys.stderr, flush=True)
    print(table(results))
    print()
    print(breakdown(results))
    if args.write:
        run = facts()
        out = Path(__file__).resolve().parent / "results" / "op-budget"
        out.with_suffix(".md").write_text(markdown(results, run))
        out.with_suffix(".json").write_text(json.dumps(to_json(results, run), indent=1) + "\n")
        print(f"wrote {out}.md and .json", file=sys.stderr)
    problems = over_budget(results)
    for problem in problems:
        print("over budget:", problem)
    return 1 if args.check and problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
