"""Running a test's worker on 2 gloo processes (CPU, loopback), shared by the multi-process tests."""

from __future__ import annotations

import os
import socket
import time

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(worker, args: tuple, nprocs: int = 2, timeout_s: float = 60) -> None:
    """``worker(rank, *args)`` on ``nprocs`` spawned processes; fails the test when one dies (an abort
    raises from ``join``) or when they have not all finished within ``timeout_s`` (a hang)."""
    context = mp.start_processes(worker, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"the {nprocs}-process gloo run did not finish within {timeout_s} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()


def rank_results(worker, out_dir: str, nprocs: int = 2, **load) -> list:
    """``worker(rank, port, out_dir)`` on ``nprocs`` processes (:func:`run_processes`), then what each rank
    saved as ``out_dir/rank{r}.pt``, in rank order (``load``: ``torch.load`` options)."""
    run_processes(worker, (free_port(), out_dir), nprocs=nprocs)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), **load) for r in range(nprocs)]
