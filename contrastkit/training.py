"""Small pieces every training script needs: checkpoints that resume, and a metric history."""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    """Seeds Python, NumPy and torch; returns a torch generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def save_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    **state) -> None:
    """Writes model/optimizer state plus any JSON-able ``state`` (step, history, best score…) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": model.state_dict(), "state": state}
    if optimizer is not None:
        payload["optimizer"] = optimizer.state_dict()
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint behind


def load_checkpoint(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    map_location="cpu") -> dict:
    """Restores what :func:`save_checkpoint` wrote and returns its extra ``state``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(payload["model"])
    if optimizer is not None and "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
    return payload["state"]


def save_run(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, step: int, best: float,
             best_step: int, history: History, started: float, **extra) -> None:
    """A checkpoint a training run resumes from exactly: the progress counters, the metric
    history, the wall time so far (``started`` is the run's ``time.time()`` origin) and the
    torch RNG state, plus any ``extra`` state such as the configuration."""
    save_checkpoint(path, model, optimizer, step=step, best=best, best_step=best_step, history=history.records,
                    elapsed=time.time() - started, torch_rng=torch.get_rng_state(), **extra)


def resume_run(path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, map_location="cpu"):
    """Restores what :func:`save_run` wrote, the torch RNG included.

    Returns ``(step, best, best_step, history, started)``, ``started`` shifted so that
    ``time.time() - started`` keeps counting the run's wall time across the interruption.
    """
    state = load_checkpoint(path, model, optimizer, map_location=map_location)
    torch.set_rng_state(state["torch_rng"])
    return (state["step"], state["best"], state["best_step"], History(state["history"]),
            time.time() - state["elapsed"])


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
