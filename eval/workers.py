"""Work items run a few at a time in worker processes, each with its share of the threads: ``dmc compare --jobs``
and ``bench/policy_sweep.py --jobs``. A policy's step is dozens of small tensor ops per layer and token that one
thread runs about as fast as two, so two single-threaded processes get through more than one with two threads
(measured in docs/baselines.md)."""

from __future__ import annotations

from collections.abc import Callable, Iterator


def in_processes(fn: Callable, work: list[tuple], jobs: int, threads: int) -> Iterator:
    """``fn(*args)`` for each ``args`` of ``work``, ``jobs`` at a time in spawned processes of ``threads`` threads
    each, yielded as they finish. A worker's exception is raised here; on it, on Ctrl-C or when the caller stops
    iterating, the running workers end at once and nothing more starts. ``fn`` must be importable (top level)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a forked child of a process that ran OpenMP can hang in a matmul
    pool = context.Pool(jobs, _init, (threads, context.Value("i", 0)))
    try:
        yield from pool.imap_unordered(_call, [(fn, args) for args in work])
    finally:
        pool.terminate()
        pool.join()


def _init(threads: int, counter) -> None:
    """A worker: its thread share, its own line for progress bars, and Ctrl-C left to the parent (which stops the
    pool)."""
    import signal

    import torch

    from .tasks import set_bar_position

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    with counter.get_lock():
        counter.value += 1
        set_bar_position(counter.value - 1)


def _call(fn_args: tuple):
    fn, args = fn_args
    return fn(*args)
