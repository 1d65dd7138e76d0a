"""Independent jobs run on every core: generating built-in data frame by frame.

The jobs of both generators depend only on their own arguments (frame i is a function of
(seed, split, i)), so running them in worker processes gives byte-identical files in any order.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["default_workers", "ordered_map"]

Job = TypeVar("Job")
Result = TypeVar("Result")


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity where the platform tells it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        return os.cpu_count() or 1


def ordered_map(function: Callable[[Job], Result], jobs: Iterable[Job], workers: int | None = None,
                chunksize: int = 8) -> Iterator[Result]:
    """``function(job)`` for every job, yielded in the jobs' order, computed by ``workers`` processes
    (default: one per core; 1 runs them here). ``function`` must be a module-level function."""
    workers = default_workers() if workers is None else workers
    if workers <= 1:
        yield from map(function, jobs)
        return
    # fork: the workers inherit the parent's imports and sys.path (the examples import their
    # packages relative to the script's folder, which a spawned worker would not see).
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    with context.Pool(workers) as pool:
        yield from pool.imap(function, jobs, chunksize=chunksize)
