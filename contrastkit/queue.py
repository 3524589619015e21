"""A FIFO memory of past keys (MoCo-style) with optional labels and groups."""

from __future__ import annotations

import torch
from torch import nn

from . import _validation as v
from ._options import SHARED
from .distributed import gather_keys


class MemoryQueue(nn.Module):
    """A first-in first-out buffer of ``size`` detached keys of dimension ``dim``.

    Keys can carry labels (class ids, partition ids, ...) and groups. The buffers are module
    buffers, so the queue follows ``.to(device)`` and is saved in ``state_dict``.

    ``enqueue`` is DDP-aware: when torch.distributed is initialised it all-gathers the keys
    (and labels, groups) of every rank, rank 0 first, and enqueues them all, so the queue is the
    same on every rank. It is then a collective: every rank must call it.

    When one enqueue holds more rows than the queue's size, only the newest ``size`` rows are
    kept. Once a queue holds labels (or groups), every enqueue must give them, and vice versa,
    until :meth:`reset`.

    Losses take it as ``queue=`` and append its keys with :func:`append_queue`, one rule for
    all: queue keys are shared by every group (``SHARED``), and they are positives by label when
    the loss uses the queue's labels, otherwise negatives of every anchor. To use it with
    :func:`contrastkit.info_nce` directly, call :func:`append_queue` on your keys and pass the
    position of the queries among the keys as ``self_key_offset``.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
        self.size, self.dim = size, dim
        self.register_buffer("key_buffer", torch.zeros(size, dim, dtype=dtype, device=device))
        self.register_buffer("label_buffer", torch.zeros(size, dtype=torch.long, device=device))
        self.register_buffer("group_buffer", torch.zeros(size, dtype=torch.long, device=device))
        # [next write position, filled rows, holds labels, holds groups]: saved in state_dict, and
        # mirrored on the host (_counters), so that no call reads the device to know them.
        self.register_buffer("state", torch.zeros(4, dtype=torch.long, device=device))
        self._counters = [0, 0, 0, 0]
        self.register_load_state_dict_post_hook(_read_counters)

    def __len__(self) -> int:
        return self._counters[1]

    @property
    def has_labels(self) -> bool:
        return bool(self._counters[2])

    @property
    def has_groups(self) -> bool:
        return bool(self._counters[3])

    def reset(self) -> None:
        self._set_counters(0, 0, 0, 0)

    def _set_counters(self, *counters: int) -> None:
        self._counters = [int(c) for c in counters]
        for i, c in enumerate(self._counters):
            self.state[i] = c  # a fill from a host number: no sync

    def _in_fifo_order(self, buffer: torch.Tensor) -> torch.Tensor:
        write, filled = self._counters[0], len(self)
        if filled < self.size:
            return buffer[:filled]
        return torch.cat([buffer[write:], buffer[:write]])

    @property
    def keys(self) -> torch.Tensor:
        """(len, dim) keys, oldest first."""
        return self._in_fifo_order(self.key_buffer)

    @property
    def labels(self) -> torch.Tensor | None:
        """(len,) labels, oldest first, or ``None`` when the queue holds no labels."""
        return self._in_fifo_order(self.label_buffer) if self.has_labels else None

    @property
    def groups(self) -> torch.Tensor | None:
        """(len,) groups, oldest first, or ``None`` when the queue holds no groups."""
        return self._in_fifo_order(self.group_buffer) if self.has_groups else None

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor | None = None,
                groups: torch.Tensor | None = None) -> None:
        """Append ``keys`` (n, dim), detached and cast to the queue's dtype, dropping the oldest."""
        v.check_embeddings("keys", keys)
        keys = v.as_rows(keys)
        if keys.shape[1] != self.dim:
            raise ValueError(f"keys must have dim {self.dim}; got shape {tuple(keys.shape)}")
        if keys.device != self.key_buffer.device:
            raise ValueError(f"keys are on {keys.device} but the queue is on {self.key_buffer.device}")
        n = keys.shape[0]
        labels = v.check_index_vector("labels", labels, n, keys.device, "key")
        groups = v.check_index_vector("groups", groups, n, keys.device, "key")
        if len(self):
            held_now = (("labels", labels, self.has_labels), ("groups", groups, self.has_groups))
            for name, given, held in held_now:
                if (given is not None) != held:
                    raise ValueError(
                        f"this queue {'holds' if held else 'holds no'} {name}: enqueue with "
                        f"{name}={'a tensor' if held else 'None'}, or reset() it first"
                    )
        # Checked after the cast: finite keys beyond a float16 queue's range would be stored as Inf.
        keys = keys.detach().to(self.key_buffer.dtype)
        if v.value_checks_enabled(keys.device):
            checks = [v.finite_check((f"keys (cast to the queue's {self.key_buffer.dtype}, whose largest value is "
                                      f"{torch.finfo(self.key_buffer.dtype).max:g})", keys))]
            if labels is not None:
                checks.append(((labels < -1).any(), "labels must be class ids >= 0, or -1 for a key that the "
                                                    "default ignore_index=-1 leaves out"))
            if groups is not None:
                checks.append(((groups < SHARED).any(), f"groups must be ids >= 0 or SHARED={SHARED}"))
            v.raise_first_failure(checks)
        keys, labels, groups, _ = gather_keys(keys, labels, groups)

        n = keys.shape[0]
        if n > self.size:  # only the newest rows survive
            keys, n = keys[-self.size :], self.size
            labels = None if labels is None else labels[-self.size :]
            groups = None if groups is None else groups[-self.size :]
        write = self._counters[0]
        positions = (write + torch.arange(n, device=keys.device)) % self.size
        self.key_buffer[positions] = keys
        if labels is not None:
            self.label_buffer[positions] = labels
        if groups is not None:
            self.group_buffer[positions] = groups
        self._set_counters((write + n) % self.size, min(len(self) + n, self.size), labels is not None,
                           groups is not None)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, filled={len(self)}"


def _read_counters(queue: MemoryQueue, incompatible_keys) -> None:
    """After load_state_dict: the host copy of the counters, checked for a queue they can describe."""
    write, filled, has_labels, has_groups = (int(c) for c in queue.state.tolist())
    consistent = (0 <= filled <= queue.size and 0 <= write < queue.size and has_labels in (0, 1)
                  and has_groups in (0, 1) and (filled == queue.size or write == filled))
    if not consistent:
        raise ValueError(f"the state_dict's queue state {[write, filled, has_labels, has_groups]} (next write, "
                         f"filled, holds labels, holds groups) does not describe a queue of size {queue.size}")
    queue._counters = [write, filled, has_labels, has_groups]


def queued_keys(queue: MemoryQueue | None, like: torch.Tensor, need_labels: str | None = None):
    """The queue's keys cast to ``like``'s dtype, and its labels (None when it holds none).

    Returns ``(keys, labels)``; ``keys`` is None for no queue or an empty one. ``need_labels``
    names the loss that needs labels from the queue, for the error message.
    """
    if queue is None:
        return None, None
    if not isinstance(queue, MemoryQueue):
        raise TypeError(f"queue must be a MemoryQueue or None; got {type(queue).__name__}")
    if len(queue) == 0:
        return None, None
    keys = queue.keys
    if keys.device != like.device:
        raise ValueError(f"the queue is on {keys.device} but the embeddings are on {like.device}")
    if keys.shape[1] != like.shape[-1]:
        raise ValueError(
            f"the queue holds keys of dim {keys.shape[1]} but the embeddings have {like.shape[-1]}"
        )
    if need_labels is not None and not queue.has_labels:
        raise ValueError(f"{need_labels} needs a queue that holds labels; enqueue keys with labels")
    return keys.to(like.dtype), queue.labels


def append_queue(
    queue: MemoryQueue | None,
    keys: torch.Tensor,
    key_labels: torch.Tensor,
    key_groups: torch.Tensor | None = None,
    *,
    labels: torch.Tensor | None = None,
    use_queue_labels: str | None = None,
    ignore_index: int = -1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A loss's keys followed by the queue's keys, with their labels and groups: the one rule.

    - Queue keys are shared by every group: their group is ``SHARED`` (when the loss has groups).
    - Their labels are the queue's own when ``use_queue_labels`` names the loss that uses them
      (the queue must then hold labels): positives of the anchors with that label, negatives of
      the rest. Otherwise they all get one label that no query (``labels``) or key has and that
      is not ``ignore_index``: negatives of every anchor.

    Returns ``(keys, key_labels, key_groups)``, unchanged for no queue or an empty one.
    """
    queued, queued_labels = queued_keys(queue, keys, need_labels=use_queue_labels)
    if queued is None:
        return keys, key_labels, key_groups
    if use_queue_labels is None:
        # max + 1 as a tensor: no host synchronisation.
        known = [key_labels.max(), key_labels.new_tensor(ignore_index)]
        if labels is not None:
            known.append(labels.max())
        queued_labels = (torch.stack(known).max() + 1).expand(queued.shape[0])
    keys, key_labels = torch.cat([keys, queued]), torch.cat([key_labels, queued_labels.to(key_labels.dtype)])
    if key_groups is not None:
        key_groups = torch.cat([key_groups, key_groups.new_full((queued.shape[0],), SHARED)])
    return keys, key_labels, key_groups
