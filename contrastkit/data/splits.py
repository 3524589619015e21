"""Seeded train/val/test splits with a labeled part of train, stored as JSON.

The order comes from SHA-256 of ``"<seed>:<id>"``, so a split depends only on the ids,
the seed and the fractions: not on the order the ids are listed, the platform, the Python
hash seed or the NumPy version. Two consequences worth knowing:

- with the same seed, val/test fractions and ids, the labeled set at fraction 0.1 is a
  subset of the labeled set at 0.2 (labeled ids are a prefix of the same order);
- adding ids to the pool keeps the relative order of the existing ids (their hash keys
  do not change), so most of them stay in the part they were in.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

SPLIT_FORMAT = "contrastkit-split/1"
PARTS = ("train_labeled", "train_unlabeled", "val", "test")


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even; half up is easier to state in the docs.
    return int(math.floor(x + 0.5))


def _check_fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1]; got {value!r}")
    return float(value)


def _order(ids: Iterable[str], seed: int) -> list[str]:
    return sorted(ids, key=lambda i: (hashlib.sha256(f"{seed}:{i}".encode()).hexdigest(), i))


@dataclass(frozen=True)
class Split:
    """Disjoint id lists. ``train`` is ``train_labeled + train_unlabeled``. Lists are sorted."""

    train_labeled: list[str]
    train_unlabeled: list[str]
    val: list[str]
    test: list[str]
    seed: int | None = None
    fractions: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        for part in PARTS:
            ids = getattr(self, part)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise TypeError(f"split part {part!r} must be a list of id strings")
            for i in ids:
                if i in seen:
                    raise ValueError(
                        f"id {i!r} is in both {seen[i]!r} and {part!r}; split parts must be disjoint"
                    )
                seen[i] = part

    @property
    def train(self) -> list[str]:
        return sorted(self.train_labeled + self.train_unlabeled)

    def to_dict(self) -> dict:
        return {"format": SPLIT_FORMAT, "seed": self.seed, "fractions": dict(self.fractions)} | {
            part: list(getattr(self, part)) for part in PARTS
        }

    def save(self, path) -> Path:
        """Write the split as JSON (see docs/data.md for the format); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> Split:
        """Read a split written by :meth:`save`; checks the format tag and disjointness."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"split file {path} is not valid JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != SPLIT_FORMAT:
            raise ValueError(f'split file {path} lacks "format": {SPLIT_FORMAT!r}')
        missing = [p for p in PARTS if p not in data]
        if missing:
            raise ValueError(f"split file {path} lacks the parts {missing}")
        return cls(
            **{p: data[p] for p in PARTS}, seed=data.get("seed"), fractions=data.get("fractions") or {}
        )


def make_split(
    ids: Iterable[str], *, seed: int = 0, val: float = 0.1, test: float = 0.1, labeled: float = 1.0
) -> Split:
    """Split ``ids`` into test, val and train, then train into labeled and unlabeled.

    Counts: ``n_test = round(test * n)``, ``n_val = round(val * n)``, the rest is train;
    ``n_labeled = round(labeled * n_train)`` (rounding half up), at least 1 when
    ``labeled > 0`` and train is not empty. For Kvasir-SEG's 998 ids with the usual
    80/10/10 split: test 100, val 100, train 798, and labeled=0.1 gives 80 labeled ids.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int; got {seed!r}")
    if isinstance(ids, str):
        raise TypeError("ids must be an iterable of id strings, not one string")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("ids contains duplicates")
    val, test, labeled = (
        _check_fraction(n, v) for n, v in (("val", val), ("test", test), ("labeled", labeled))
    )
    if val + test > 1.0:
        raise ValueError(f"val + test must be at most 1; got {val} + {test}")
    n = len(ids)
    n_test = _round_half_up(test * n)
    n_val = min(_round_half_up(val * n), n - n_test)
    order = _order(ids, seed)
    test_ids, val_ids, train_ids = order[:n_test], order[n_test : n_test + n_val], order[n_test + n_val :]
    n_labeled = _round_half_up(labeled * len(train_ids))
    if labeled > 0 and train_ids:
        n_labeled = max(n_labeled, 1)
    return Split(
        train_labeled=sorted(train_ids[:n_labeled]),
        train_unlabeled=sorted(train_ids[n_labeled:]),
        val=sorted(val_ids),
        test=sorted(test_ids),
        seed=seed,
        fractions={"val": val, "test": test, "labeled": labeled},
    )
