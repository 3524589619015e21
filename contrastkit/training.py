"""Small pieces every training script needs: checkpoints that resume exactly, a metric history,
a learning-rate schedule, mixed precision, and multi-process (``torchrun`` / DDP) set-up.

Everything works in a single process on a CPU: without a process group the distributed
helpers do nothing, so one script runs unchanged as ``python script.py`` and as
``torchrun --nproc_per_node=N script.py``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import subprocess
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .distributed import get_rank, get_world_size, is_distributed


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch; returns a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and integer ``keys`` (e.g. step and rank).

    Different keys give unrelated streams (NumPy ``SeedSequence`` hashing), the same keys the
    same seed. Seeding torch with ``derived_seed(seed, step, rank)`` before each step's random
    augmentation makes it depend on the step and the rank only: a resumed run redraws exactly
    what an uninterrupted one drew, and no two ranks draw the same transforms.
    """
    for name, value in (("seed", seed), *((f"keys[{i}]", k) for i, k in enumerate(keys))):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative int; got {value!r}")
    state = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def code_version(path=None) -> dict:
    """The code a run trains with, for its ``metrics.json``: the git commit of the checkout holding
    ``path`` (default: this package), whether tracked files differ from it (``dirty``), and the
    contrastkit and torch versions. ``commit`` and ``dirty`` are None outside a git checkout (an
    installed wheel) or without git. A study compares runs of one commit; this is how it can tell."""
    from . import __version__

    where = Path(path) if path is not None else Path(__file__).resolve().parent
    where = where if where.is_dir() else where.parent

    def git(*args):
        return subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True, timeout=30,
                              check=True).stdout.strip()

    try:
        commit, dirty = git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty, "contrastkit": __version__, "torch": torch.__version__}


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and ``torch.compile`` wrappers (any nesting)."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def _write(path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def _payload(model, optimizer, state: dict) -> dict:
    payload = {"model": unwrap_model(model).state_dict(), "state": state}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
        # Another optimizer class takes this state without complaint and fails at its first step
        # (SGD on AdamW's: KeyError 'momentum'); the name lets a resume say which two disagree.
        payload["optimizer_class"] = type(optimizer).__name__
    return payload


def _load(path, map_location="cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # a truncated or foreign file fails in pickle, zipfile or torch, each its own way
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or not {"model", "state"} <= payload.keys():
        raise ValueError(f"{path} is not a checkpoint of contrastkit.training (no model and state in it)")
    return payload


def _read(path, model, optimizer, map_location) -> dict:
    payload = _load(path, map_location)
    try:
        unwrap_model(model).load_state_dict(payload["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit this model: {err}") from err
    if optimizer is not None and "optimizer" in payload:
        saved, ours = payload.get("optimizer_class"), type(optimizer).__name__
        if saved is not None and saved != ours:
            raise ValueError(f"{path} holds the optimizer state of {saved}, which {ours} cannot take over")
        optimizer.load_state_dict(payload["optimizer"])
    return payload


def checkpoint_state(path) -> dict:
    """The extra state of the checkpoint at ``path`` (step, configuration…) without a model to load it
    into; raises FileNotFoundError or ValueError naming ``path`` when it holds no readable checkpoint."""
    return _load(path)["state"]


def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    **state) -> None:
    """Writes model/optimizer state plus any JSON-able ``state`` (step, history, best score…) atomically.

    The weights are those of the plain module (:func:`unwrap_model`), so a checkpoint written
    under DDP or ``torch.compile`` loads into a bare model and vice versa.
    """
    _write(path, _payload(model, optimizer, state))


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location="cpu") -> dict:
    """Restores what :func:`save_checkpoint` wrote and returns its extra ``state``."""
    return _read(path, model, optimizer, map_location)["state"]


def save_run(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int, best: float,
             best_step: int, history: History, started: float, scheduler=None, scaler=None, carry=(),
             **extra) -> None:
    """A checkpoint a training run resumes from exactly: the progress counters, the metric
    history, the wall time so far (``started`` is the run's ``time.time()`` origin) and the
    torch RNG state, plus any ``extra`` state such as the configuration. ``scheduler`` (an
    :class:`LRSchedule`) and ``scaler`` (a :class:`MixedPrecision` or ``GradScaler``) are saved
    through their ``state_dict()`` when given.

    ``carry``: checkpoint files of the run that it still needs (its best model, a teacher) whose
    weights travel inside this checkpoint, so that :func:`resume_run` can write them into whatever
    folder the run continues in."""
    payload = _payload(model, optimizer, dict(step=step, best=best, best_step=best_step, history=history.records,
                                              elapsed=time.time() - started, torch_rng=torch.get_rng_state(),
                                              **extra))
    for key, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None:
            payload[key] = obj.state_dict()
    payload["carry"] = {Path(file).name: _load(file)["model"] for file in carry}
    _write(path, payload)


def resume_run(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, map_location="cpu", *,
               scheduler=None, scaler=None, carry_to=None):
    """Restores what :func:`save_run` wrote, the torch RNG included (and ``scheduler`` /
    ``scaler`` when given; an :class:`LRSchedule` missing from an older checkpoint is set to
    the saved step).

    ``carry_to``: a folder to write the files the checkpoint carries into (weights only; pass it on
    one process). A carried file is rewritten unless the folder is the checkpoint's own and holds it
    already, so a folder another run left files in gets this run's.

    Returns ``(step, best, best_step, history, started)``, ``started`` shifted so that
    ``time.time() - started`` keeps counting the run's wall time across the interruption.
    """
    payload = _read(path, model, optimizer, map_location)
    state = payload["state"]
    torch.set_rng_state(state["torch_rng"])
    if scheduler is not None:
        scheduler.load_state_dict(payload.get("scheduler", {"step": state["step"]}))
    if scaler is not None and payload.get("scaler"):
        scaler.load_state_dict(payload["scaler"])
    if carry_to is not None:
        own_folder = Path(carry_to).resolve() == Path(path).resolve().parent
        for name, weights in payload.get("carry", {}).items():
            if not (own_folder and (Path(carry_to) / name).is_file()):
                _write(Path(carry_to) / name, {"model": weights, "state": {"carried_by": str(path)}})
    return (state["step"], state["best"], state["best_step"], History(state["history"]),
            time.time() - state["elapsed"])


# The example scripts' settings that change how a run executes or what it reports, never what it
# trains, so a resumed run may change them freely: where it writes, the hardware, threads and wall-time
# budget, what it tests once trained, and how it started (a resume supersedes --stage1-from; a preset
# is the values it set, which are compared one by one). --channels-last and --compile compute the same
# model in another memory layout or traced, which, like another --device, changes only float rounding.
RESUME_MAY_CHANGE = frozenset({
    "out", "resume", "resume_anyway", "device", "threads", "time_budget", "channels_last", "compile",
    "test_data", "test_volumes", "stage1_from", "preset", "preset_values",
})


def compare_configs(saved: dict, current: dict, ignore=RESUME_MAY_CHANGE) -> dict[str, tuple]:
    """``{setting: (saved value, current value)}`` for the settings in which two run configurations
    (``vars(args)``) differ, but for those in ``ignore``. A setting only one side has is not compared:
    a checkpoint written before the flag existed cannot say what it used."""
    return {k: (saved[k], current[k]) for k in sorted(saved.keys() & current.keys() - set(ignore))
            if saved[k] != current[k]}


def config_changes(state: dict, config: dict, ignore=RESUME_MAY_CHANGE) -> list[dict]:
    """The configuration changes of a run that resumes from a checkpoint's ``state`` with ``config``:
    those the checkpoint records (``config_changes``, saved by the run's earlier legs), then this
    resume's when ``config`` differs (:func:`compare_configs`), as ``{"step", "differences":
    {setting: [checkpoint's, new]}, "resumed_from_config"}``. Empty for a run of one configuration."""
    changes = list(state.get("config_changes", []))
    saved = state.get("config", {})
    differences = compare_configs(saved, config, ignore)
    if differences:
        changes.append({"step": state["step"], "differences": {k: list(v) for k, v in differences.items()},
                        "resumed_from_config": saved})
    return changes


class History:
    """Per-epoch (or per-evaluation) records, e.g. ``{"step": 100, "train/loss": 0.3, "val/dice": 0.7}``."""

    def __init__(self, records: list[dict] | None = None) -> None:
        self.records = list(records or [])

    def append(self, **values) -> None:
        self.records.append({k: float(v) if isinstance(v, (int, float, np.floating, torch.Tensor)) else v
                             for k, v in values.items()})

    def series(self, key: str) -> tuple[list, list]:
        """(steps, values) of the records that have ``key``."""
        pairs = [(r.get("step", i), r[key]) for i, r in enumerate(self.records) if key in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for record in self.records:
            seen.update(dict.fromkeys(k for k in record if k != "step"))
        return list(seen)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.records, indent=2))


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule

SCHEDULES = ("poly", "cosine", "constant")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    return int(value)


class LRSchedule:
    """Learning rate as a closed-form function of the optimizer step, for every param group.

    ``lr(step) = base_lr · factor(step)`` where, after ``warmup_steps`` of linear warm-up
    (``factor = (step + 1) / warmup_steps``), with ``t = (step − warmup) / (total − warmup)``:

    * ``"poly"``: ``(1 − t) ** power``, the rule of SSL4MIS, UniMatch and BCP
      (``lr · (1 − iter / max_iter) ** 0.9``, power 0.9, no warm-up);
    * ``"cosine"``: ``½ · (1 + cos(π t))``;
    * ``"constant"``: 1.

    Steps at or past ``total_steps`` use ``t = 1`` (poly and cosine reach 0). Call
    :meth:`step` after each ``optimizer.step()``: step 0 trains at the base rate (after
    warm-up), step s at ``lr(s)``. The base rates are the optimizer's learning rates when the
    schedule is built (``initial_lr`` when a param group has one).

    The state is the step count alone, so :meth:`load_state_dict` restores the learning rate
    exactly; the shape (kind, total steps, power, warm-up) is the constructor's, which lets a
    resumed run change ``total_steps`` on purpose.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, kind: str = "poly", *,
                 power: float = 0.9, warmup_steps: int = 0) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if kind not in SCHEDULES:
            raise ValueError(f"kind must be one of {SCHEDULES}; got {kind!r}")
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be smaller than total_steps ({total_steps})")
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power < 0:
            raise ValueError(f"power must be a finite number >= 0; got {power!r}")
        self.optimizer, self.kind, self.power = optimizer, kind, float(power)
        self.base_lrs = [float(group.setdefault("initial_lr", group["lr"])) for group in optimizer.param_groups]
        self.step_count = 0
        self._apply()

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rates at optimizer step ``step`` (0-based)."""
        step = _check_int("step", step, 0)
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        t = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        if self.kind == "poly":
            return (1.0 - t) ** self.power
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * t))
        return 1.0

    def _apply(self) -> None:
        factor = self.factor(self.step_count)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        """Advance by one optimizer step and set the next step's learning rates."""
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        """The learning rates the next ``optimizer.step()`` uses."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step": self.step_count, "kind": self.kind, "total_steps": self.total_steps,
                "power": self.power, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = _check_int("state['step']", state.get("step"), 0)
        self._apply()

    def __repr__(self) -> str:
        return (f"LRSchedule(kind={self.kind!r}, total_steps={self.total_steps}, power={self.power}, "
                f"warmup_steps={self.warmup_steps}, step={self.step_count})")


# ---------------------------------------------------------------------------------------------
# Mixed precision

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """Autocast and gradient scaling for one training step.

    ``mode``: ``"none"`` (float32), ``"bf16"`` (autocast to bfloat16; no scaling needed, works
    on CPUs and on GPUs from Ampere on) or ``"fp16"`` (autocast to float16 with a
    ``torch.amp.GradScaler`` that scales the loss and skips steps whose gradients overflow)::

        amp = MixedPrecision("bf16", device)
        with amp.autocast():
            loss = criterion(model(x), y)
        amp.backward(loss)
        amp.step(optimizer)        # unscales, steps (or skips on overflow), updates the scale

    ``state_dict()`` is the scaler's (empty unless fp16), for exact resumption.
    """

    def __init__(self, mode: str = "none", device="cpu") -> None:
        if mode not in AMP_DTYPES:
            raise ValueError(f"mode must be one of {tuple(AMP_DTYPES)}; got {mode!r}")
        self.mode = mode
        self.device_type = torch.device(device).type
        self.dtype = AMP_DTYPES[mode]
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=mode == "fp16")

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self):
        """The autocast context of the forward pass (a no-op for ``"none"``)."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler.is_enabled():
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler.is_enabled() and state:
            self.scaler.load_state_dict(state)

    def __repr__(self) -> str:
        return f"MixedPrecision({self.mode!r}, device_type={self.device_type!r})"


# ---------------------------------------------------------------------------------------------
# Multi-process training (torchrun + DistributedDataParallel)


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # the process group was created by init_distributed (cleanup ends it)
    # DDP wrappers prepare_model made under this context, released by distributed_run at the end
    ddp_wrappers: list = field(default_factory=list, repr=False, compare=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set (torchrun sets it)")
        return default
    try:
        return int(value)
    except ValueError as err:
        raise ValueError(f"environment variable {name} must be an integer; got {value!r}") from err


def world_size_from_env() -> int:
    """The number of processes torchrun started (``$WORLD_SIZE``), 1 without torchrun."""
    return get_world_size() if dist.is_available() and dist.is_initialized() else _env_int("WORLD_SIZE", 1)


def init_distributed(device=None, *, backend: str | None = None, timeout_s: float | None = None) -> DistributedContext:
    """Joins the process group torchrun describes, or stays a single process.

    torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
    with ``WORLD_SIZE`` unset or 1 nothing is initialised. ``device`` (default: CUDA when
    available, else CPU): on CUDA each process takes ``cuda:LOCAL_RANK`` (unless an index is
    given) and the backend defaults to NCCL; on CPU to gloo. A process group that already
    exists is used as it is (and left running by :func:`cleanup_distributed`).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local)
        return DistributedContext(rank, world, local, device, owns_group=False)
    world = _env_int("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE must be >= 1; got {world}")
    if world == 1:
        return DistributedContext(0, 1, 0, device)
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK", _env_int("RANK"))
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs = {"timeout": timedelta(seconds=timeout_s)} if timeout_s else {}
    dist.init_process_group(backend, rank=rank, world_size=world, **kwargs)
    return DistributedContext(rank, world, local, device, owns_group=True)


def cleanup_distributed(context: DistributedContext) -> None:
    """Ends the process group :func:`init_distributed` created (nothing otherwise), then releases the
    gradient reducers of the DDP wrappers :func:`prepare_model` made under ``context``.

    A reducer that outlives its group until the interpreter exits makes gloo abort the process
    ("terminate called without an active exception") in about one run in four when a peer is still
    alive; a traceback or a caller's variable is enough to keep it. Released, the wrapper no longer
    trains; the plain model keeps the weights.
    """
    if context.owns_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    for ref in context.ddp_wrappers:
        wrapper = ref()
        if wrapper is not None:
            wrapper.reducer = None
    context.ddp_wrappers.clear()
    gc.collect()


@contextlib.contextmanager
def distributed_run(device=None, *, backend: str | None = None, timeout_s: float | None = None):
    """``with distributed_run(device) as context:`` — :func:`init_distributed` on entry, and on exit
    every rank leaves together before the group ends.

    A rank that finishes early (rank 0 alone evaluates and writes files) waits at a barrier for the
    others, so that every rank's last collective is done before the group ends. A run that raises
    skips the barrier (a peer may be inside another collective) and ends at once. Either way
    :func:`cleanup_distributed` then releases the DDP reducers, whatever still refers to them.
    """
    context = init_distributed(device, backend=backend, timeout_s=timeout_s)
    try:
        yield context
    except BaseException:
        cleanup_distributed(context)
        raise
    if context.owns_group and dist.is_available() and dist.is_initialized():
        dist.barrier()
    cleanup_distributed(context)


def is_main_process() -> bool:
    """True on rank 0 and in a single process: the one that evaluates, prints and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Waits for every rank (e.g. until rank 0 has written a checkpoint); no-op in one process."""
    if is_distributed():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable value) on every rank; ``obj`` itself in one process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def mean_over_ranks(values: dict[str, float]) -> dict[str, float]:
    """The mean over ranks of each value (every rank passes the same keys); ``values`` in one process."""
    if not isinstance(values, dict):
        raise TypeError(f"values must be a dict of numbers; got {type(values).__name__}")
    if not is_distributed():
        return dict(values)
    keys = sorted(values)
    if broadcast_object(keys) != keys:
        raise ValueError(f"every rank must pass the same keys to mean_over_ranks; rank {get_rank()} has {keys}")
    total = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(total)
    means = dict(zip(keys, (total / get_world_size()).tolist(), strict=True))
    return {k: means[k] for k in values}


class TimeBudget:
    """A wall-time budget for a training loop: ``expired()`` turns True, on every process at the same
    step, once ``seconds`` have passed since the budget was made (this process's run, not a resumed
    run's total). ``None`` never expires.

    Under torchrun rank 0's clock decides and the answer is shared, so no rank stops a step before
    another; the processes agree only every ``check_every`` steps, so that a GPU is not made to wait
    for the host at every step.
    """

    def __init__(self, seconds: float | None, check_every: int = 10):
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                    or not seconds > 0):
            raise ValueError(f"seconds must be a positive number or None; got {seconds!r}")
        self.seconds, self.check_every = seconds, _check_int("check_every", check_every, 1)
        self.started, self.calls, self.stopped = time.monotonic(), 0, False

    def expired(self) -> bool:
        if self.seconds is None or self.stopped:
            return self.stopped
        self.calls += 1
        if self.calls % self.check_every and is_distributed():
            return False
        self.stopped = bool(broadcast_object(time.monotonic() - self.started > self.seconds))
        return self.stopped


def prepare_model(model: torch.nn.Module, context: DistributedContext | None = None, *,
                  channels_last: bool = False, compile_backend: str | None = None,
                  sync_batchnorm: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Moves ``model`` to the context's device and wraps it for training.

    Returns ``(model, train_model)``: ``model`` is the plain module (evaluate it, checkpoint
    it), ``train_model`` the one to call in training steps — ``model`` itself, wrapped in
    DistributedDataParallel under torchrun, then in ``torch.compile(backend=compile_backend)``
    when a backend is given (``"inductor"`` is torch's default compiler).

    DDP runs with ``find_unused_parameters=True`` because semi-supervised steps often leave
    a head unused (a projection head during a supervised stage); such parameters keep no
    gradient on any rank, exactly as in a single process. ``channels_last`` converts the
    weights to the NHWC memory format (feed NHWC inputs too); ``sync_batchnorm`` converts
    BatchNorm layers to SyncBatchNorm, which PyTorch supports on GPUs only when distributed.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    context = context or DistributedContext()
    if compile_backend is not None and not isinstance(compile_backend, str):
        raise TypeError(f"compile_backend must be None or a backend name; got {compile_backend!r}")
    if sync_batchnorm:
        if context.distributed and context.device.type == "cpu":
            raise ValueError("sync_batchnorm needs GPUs under torchrun: SyncBatchNorm does not run on CPU tensors")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(context.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = model
    if context.distributed:
        device_ids = [context.device.index] if context.device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                                find_unused_parameters=True)
        context.ddp_wrappers.append(weakref.ref(train_model))
    if compile_backend:
        train_model = torch.compile(train_model, backend=compile_backend)
    return model, train_model
