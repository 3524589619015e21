"""Argument checks shared by every public entry point, the value-check switch, and the dtype policy.

Shape, dtype and device checks are static and run on every call. Checks that need the
values (NaN/Inf, label ranges, a tensor temperature's value) wait for the device (a host
sync, which stalls a GPU's pipeline), so they run only where :func:`value_checks_enabled` says:
by default on the CPU and not on CUDA, always off while ``torch.compile`` traces a call, and
as :func:`set_value_checks` or the environment variable ``CONTRASTKIT_VALUE_CHECKS`` (``1`` /
``0``) say otherwise. Each entry point tests all of its value checks in one synchronisation.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import numbers
import os

import torch

from ._options import SHARED

DENOMINATORS = ("all", "each_positive", "negatives")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "reference", "dense", "torch", "triton")


# τ outside this range is refused: below it a logit's exponent underflows τ's own gradient (τ ≤ 1e-20
# gave -inf), above it float32 cannot hold 1/τ's use as a scale; every published τ is 0.01 to 1.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-6, 1e6

VALUE_CHECKS_ENV = "CONTRASTKIT_VALUE_CHECKS"
_value_checks: bool | None = None  # set_value_checks; None: the environment, else by device


def set_value_checks(enabled: bool | None) -> None:
    """Turn the value checks (NaN/Inf embeddings, label and group ranges, a tensor τ's value) on
    or off for every device; ``None`` restores the default: ``CONTRASTKIT_VALUE_CHECKS`` if set,
    else on for CPU tensors and off for CUDA ones (each check there is a host sync)."""
    global _value_checks
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool or None; got {type(enabled).__name__}")
    _value_checks = enabled


@contextlib.contextmanager
def value_checks(enabled: bool | None):
    """:func:`set_value_checks` for the duration of a ``with`` block."""
    global _value_checks
    before = _value_checks
    set_value_checks(enabled)
    try:
        yield
    finally:
        _value_checks = before


def value_checks_enabled(device: torch.device) -> bool:
    """Whether calls on ``device`` check their values now (never while torch.compile traces)."""
    if torch.compiler.is_compiling():
        return False
    if _value_checks is not None:
        return _value_checks
    setting = os.environ.get(VALUE_CHECKS_ENV, "").strip().lower()
    if setting in ("1", "true", "on", "yes"):
        return True
    if setting in ("0", "false", "off", "no"):
        return False
    if setting:
        raise ValueError(f"{VALUE_CHECKS_ENV} must be 1 or 0 (or unset); got {setting!r}")
    return device.type == "cpu"


def plain(x):
    """A tensor subclass (MONAI's MetaTensor, ...) as a plain ``torch.Tensor`` on the same data and
    autograd graph; anything else unchanged. A subclass's ``__torch_function__`` runs on every op it
    meets: MetaTensor's merges the metadata of a batch's images and fails on indices that reorder
    them (``sample_anchors``), and a loss's outputs would come back as subclasses."""
    if type(x) is torch.Tensor:  # the common case first: this runs on every loss call
        return x
    if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter):
        return x.as_subclass(torch.Tensor)
    return x


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs accumulate in float32; float32 and float64 keep their own."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def in_compute_dtype(x: torch.Tensor) -> torch.Tensor:
    """``x`` in its :func:`compute_dtype` (itself when it is one already, without a dispatched no-op)."""
    return x if x.dtype == torch.float32 or x.dtype == torch.float64 else x.to(torch.float32)


def settings_check(check):
    """A check of a call's settings, remembered once it passes: settings are a handful of strings,
    numbers and flags that repeat call after call, and at the papers' sizes re-checking them on
    every call is a noticeable part of a loss's time. Arguments are compared with their types
    (``True`` is not ``1``); a check that raises, takes an unhashable or a keyword argument, or runs
    under ``torch.compile`` is not remembered. For checks that no tensor passes (a tensor would be
    remembered by identity and kept alive)."""
    remembered = functools.lru_cache(maxsize=256, typed=True)(check)

    @functools.wraps(check)
    def checked(*args, **kwargs):
        if kwargs or torch.compiler.is_compiling():
            return check(*args, **kwargs)
        try:
            return remembered(*args)
        except TypeError:  # an unhashable argument, or the check's own TypeError, raised again here
            return check(*args)

    return checked


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool; got {type(value).__name__}")
    return value


def check_same_maps(name_a: str, a, name_b: str, b, dims: int, layout: str) -> None:
    """Two tensors with the same shape, dtype and device, of ``dims`` dimensions."""
    for name, x in ((name_a, a), (name_b, b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
        if x.dim() != dims:
            raise ValueError(f"{name} must be {layout}; got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} must not be empty; got shape {tuple(x.shape)}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise ValueError(f"{name_a} is on {a.device} but {name_b} is on {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} has dtype {a.dtype} but {name_b} has {b.dtype}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_temperature(temperature) -> float | torch.Tensor:
    """τ: a positive finite real number, or a 0-dim floating tensor (learnable; its value is
    checked by :func:`check_temperature_value`, which needs a device synchronisation)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.dim() != 0:
            raise ValueError(f"temperature must be a number or a 0-dim tensor; got shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating tensor; got {temperature.dtype}")
        return temperature
    return _check_number_temperature(temperature)


@settings_check
def _check_number_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a positive real number or a 0-dim floating tensor; "
                        f"got {type(temperature).__name__}")
    if torch.compiler.is_compiling():
        # torch.compile(dynamic=True) traces a module's float τ as a symbol: it has no value to test
        # here, and the module checked it when it was built.
        return temperature
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be positive and finite; got {temperature}")
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise ValueError(f"temperature must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]; got {temperature:g}")
    return temperature


def temperature_out_of_range(temperature: torch.Tensor) -> torch.Tensor:
    """A 0-dim flag: τ is NaN, Inf, or outside [MIN_TEMPERATURE, MAX_TEMPERATURE]."""
    t = temperature.detach()
    return ~(torch.isfinite(t) & (t >= MIN_TEMPERATURE) & (t <= MAX_TEMPERATURE))


def check_temperature_value(temperature: torch.Tensor) -> None:
    if bool(temperature_out_of_range(temperature)):
        value = float(temperature)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperature must be positive and finite; got {value}")
        raise ValueError(f"temperature must lie in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]; got {value:g}")


def temperature_tensor(temperature: float | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """τ as the 0-dim tensor every backend takes, in the compute dtype (gradients flow to a tensor τ)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.device != device:
            raise ValueError(f"temperature is on {temperature.device} but the embeddings are on {device}; "
                             "put it on the embeddings' device")
        return temperature.to(dtype)
    if torch.compiler.is_compiling():
        return torch.full((), temperature, dtype=dtype, device=device)
    return _constant_temperature(float(temperature), dtype, device)


@functools.lru_cache(maxsize=64)
def _constant_temperature(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # A number τ is the same tensor call after call: creating it is a device op (a launch on a
    # GPU) in a call that otherwise has about forty. It is never written to and needs no gradient.
    return torch.full((), value, dtype=dtype, device=device)


def check_embeddings(name: str, x) -> tuple[int, int]:
    """Accepts (N, D) rows or a (B, C, H, W) feature map (B*H*W rows of size C); returns (N, D)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype (float32, float64, bfloat16, float16); got {x.dtype}")
    shape = x.shape
    if len(shape) == 4:
        n, d = shape[0] * shape[2] * shape[3], shape[1]
    elif len(shape) == 2:
        n, d = shape
    else:
        raise ValueError(f"{name} must be (N, D) embeddings or a (B, C, H, W) feature map; got shape {tuple(shape)}")
    if not n or not d:
        raise ValueError(f"{name} must hold at least one embedding; got shape {tuple(shape)}" if not n else
                         f"{name} must have an embedding size D >= 1; got shape {tuple(shape)}")
    return n, d


def num_rows(x: torch.Tensor) -> int:
    """Embeddings in (N, D) rows or a (B, C, H, W) map: N, or B*H*W."""
    return x.shape[0] * x.shape[2] * x.shape[3] if x.dim() == 4 else x.shape[0]


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C), row b*H*W + h*W + w being pixel (b, h, w); rows pass through."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x


def check_pair(query: torch.Tensor, key: torch.Tensor, query_dim: int, key_dim: int) -> None:
    if key.device != query.device:
        raise ValueError(f"key is on {key.device} but query is on {query.device}; put both on one device")
    if key.dtype != query.dtype:
        raise TypeError(f"key has dtype {key.dtype} but query has {query.dtype}; use one dtype for both")
    if key_dim != query_dim:
        raise ValueError(f"key has embedding size {key_dim} but query has {query_dim}; they must match")


def check_index_vector(name: str, x, length: int, device: torch.device, what: str) -> torch.Tensor | None:
    """Labels or groups: an integer tensor with one entry per embedding (any shape of that size)."""
    if x is None:
        return None
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an integer torch.Tensor; got {type(x).__name__}")
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise TypeError(f"{name} must have an integer dtype; got {x.dtype}")
    if x.numel() != length:
        raise ValueError(f"{name} must hold one entry per {what} ({length}); got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the embeddings are on {device}")
    return x.reshape(length).long()


def finite_check(*named: tuple[str, torch.Tensor], screen: torch.Tensor | None = None):
    """One value check that the tensors hold no NaN or Inf, as a (flag, message) pair for
    :func:`raise_first_failure`. The flag screens their sums (a NaN or Inf anywhere makes the sum
    non-finite, and a sum costs a fraction of testing every element, ``x * 0 != 0`` two ops), or
    ``screen``, a tensor already computed that is finite whenever they are and not when one is not;
    only when it is set are the elements tested, the culprit named, and a finite overflow let pass."""
    if screen is not None:
        total = screen.detach() if screen.dim() == 0 else screen.detach().sum()
    else:
        sums = [x.detach().sum(dtype=compute_dtype(x.dtype)) for _, x in named]
        total = sums[0]
        for other in sums[1:]:
            total = total + other
    return total * 0 != 0, _nonfinite_message(named)


def _nonfinite_message(named):
    def message() -> str | None:
        for name, x in named:
            if not bool(torch.isfinite(x).all()):
                return f"{name} contains NaN or Inf"
        return None

    return message


def logit_overflow_check(loss: torch.Tensor, query: torch.Tensor, key: torch.Tensor, tau: torch.Tensor):
    """(flag, message) for :func:`raise_first_failure`: per-row losses that are not finite although
    the inputs were. Without normalisation a logit q·k/τ is unbounded, and beyond float32's range
    (~3e38) the loss is inf - inf; no finite answer exists in the compute dtype, so it is an error."""
    def message() -> str:
        largest = [float(as_rows(x).detach().double().norm(dim=1).max()) for x in (query, key)]
        return (f"the loss is not finite: with normalize=False the logits q·k/τ overflow "
                f"{compute_dtype(query.dtype)} (largest query norm {largest[0]:.3g}, key norm {largest[1]:.3g}, "
                f"τ = {float(tau):.3g}); scale the embeddings down or use normalize=True")
    return ~torch.isfinite(loss.detach()).all(), message


def raise_first_failure(checks) -> None:
    """Value checks in one host sync: ``checks`` are (0-dim bool flag, message) pairs, a message
    being a string or a function returning one (or None: a false alarm) that runs only when its
    flag is set. Raises ``ValueError`` with the first message."""
    if not checks:
        return
    if not bool(checks[0][0] if len(checks) == 1 else torch.stack([flag for flag, _ in checks]).any()):
        return
    for flag, message in checks:
        if bool(flag):
            text = message() if callable(message) else message
            if text is not None:
                raise ValueError(text)


def check_weights(weights, length: int, device: torch.device) -> torch.Tensor | None:
    if weights is None:
        return None
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a floating torch.Tensor; got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must have a floating dtype; got {weights.dtype}")
    if weights.numel() != length:
        raise ValueError(f"weights must hold one entry per query ({length}); got shape {tuple(weights.shape)}")
    if weights.device != device:
        raise ValueError(f"weights is on {weights.device} but the embeddings are on {device}")
    return weights.reshape(length)


_embedding_names: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "contrastkit_embedding_names", default=("query", "key"))


class embedding_names:  # noqa: N801 - used as a context manager, like contextlib's
    """Inside the block, value-check messages of ``info_nce`` call the embeddings by the names the
    caller's user knows (a loss's ``local_map``), not ``query`` / ``key``. (A class, not a
    generator: it is entered on every loss call.)"""

    __slots__ = ("names", "token")

    def __init__(self, query: str, key: str):
        self.names, self.token = (query, key), None

    def __enter__(self):
        if not torch.compiler.is_compiling():  # dynamo cannot trace a ContextVar; value checks are off then
            self.token = _embedding_names.set(self.names)
        return self

    def __exit__(self, *exc) -> None:
        if self.token is not None:
            _embedding_names.reset(self.token)
            self.token = None

    def __call__(self, function):
        """As a decorator: every call of ``function`` inside the block (each call its own block)."""
        names = self.names

        @functools.wraps(function)
        def named(*args, **kwargs):
            with embedding_names(*names):
                return function(*args, **kwargs)

        return named


def current_embedding_names() -> tuple[str, str]:
    """What the caller calls the query and the key rows (see :func:`embedding_names`)."""
    return ("query", "key") if torch.compiler.is_compiling() else _embedding_names.get()


def check_values(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor | None,
    key_labels: torch.Tensor | None,
    ignore_index: int,
    groups: torch.Tensor | None = None,
    key_groups: torch.Tensor | None = None,
    temperature: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    screen: torch.Tensor | None = None,
) -> bool:
    """Value checks: NaN/Inf embeddings, negative labels other than ignore_index, negative groups
    other than ``SHARED``, a non-positive or non-finite tensor temperature, negative or
    non-finite weights. Returns False when ``screen`` is not finite although every check holds
    (the caller recomputes it), else True.

    Every test of a device value waits for the device, so all are combined into one
    synchronisation (:func:`raise_first_failure`), the embeddings screened by their sums
    (:func:`finite_check`), or by ``screen``, a result that is finite exactly when they are (the
    loss of a call in which every embedding enters every row's value); the message naming the
    culprit is worked out only when one fails.
    """
    if screen is not None and screen.dim() == 0 and labels is None and key_labels is None and groups is None \
            and key_groups is None and temperature is None and weights is None:
        # The one test is of one number: reading it (the call's one sync) costs less than two ops on it.
        if math.isfinite(screen.item()):
            return True
        query_name, key_name = current_embedding_names()
        raise_first_failure([(True, _nonfinite_message([(query_name, query), (key_name, key)]))])
        return False

    def bad_labels(x):
        return (x < 0) & (x != ignore_index)

    def bad_groups(x):
        return (x < 0) & (x != SHARED)

    query_name, key_name = current_embedding_names()
    embeddings = [(query_name, query)] + ([] if key is query else [(key_name, key)])
    checks = []
    for name, x, bad, twin in (("labels", labels, bad_labels, None), ("key_labels", key_labels, bad_labels, labels),
                               ("groups", groups, bad_groups, None), ("key_groups", key_groups, bad_groups, groups)):
        if x is not None and x is not twin:
            allowed = (f"ignore_index={ignore_index}" if bad is bad_labels
                       else f"SHARED={SHARED} (a key or query of every group)")
            kind = "class ids" if bad is bad_labels else "group ids"
            checks.append((bad(x).any(), lambda name=name, x=x, bad=bad, allowed=allowed, kind=kind: (
                f"{name} must be non-negative {kind} or {allowed}; found {int(x[bad(x)][0])}")))
    if temperature is not None:
        checks.append((temperature_out_of_range(temperature), lambda: check_temperature_value(temperature)))
    if weights is not None:
        checks.append((~(torch.isfinite(weights) & (weights >= 0)).all(), "weights must be finite and non-negative"))
    finite, finite_message = finite_check(*embeddings, screen=screen)
    held = True

    def named_or_not_held():
        nonlocal held
        text = finite_message()
        held = screen is None or text is not None  # a message raises; none: the screen alone failed
        return text

    raise_first_failure([(finite, named_or_not_held)] + checks)
    return held
