"""Multi-process test harness: N gloo ranks on CPU, spawned fresh per call.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)``
in every rank with a process group already set up (FileStore in a fresh temp
file, one thread per rank, bounded collective timeout); a failing rank tears
it down, a passing one exits at once after a final barrier (see _worker).
``fn`` must be a top-level function of an importable module (spawn re-imports
it). A child's exception is re-raised here with its traceback; a run that
outlives ``timeout`` has its processes killed and raises TimeoutError, so a
deadlocked collective can never hang the test session.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

# Per collective: a rank that waits longer than this has lost its peers.
COLLECTIVE_TIMEOUT_S = 60
# Per run_distributed call (spawn + imports + the test body).
RUN_TIMEOUT_S = 180


def _worker(rank: int, world_size: int, store_path: str, error_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S)
    )
    try:
        fn(rank, world_size, *args)
        # Keep peers alive until all are done (a rank leaving early would make
        # the others' last collective fail with a confusing error).
        dist.barrier()
    except BaseException:
        # Recorded before this rank leaves the group, so the root cause is
        # written before the peers' "connection closed" errors.
        with open(os.path.join(error_dir, f"{time.time():.6f}_rank{rank}.txt"), "w") as fh:
            fh.write(traceback.format_exc())
        dist.destroy_process_group()
        raise
    # Every rank passed the barrier: leave without tearing the group and the
    # interpreter down. With FSDP2 / gloo threads still referenced, that
    # teardown occasionally aborted a rank ("terminate called without an active
    # exception", once at world size 4 on 2 cores) after the test had passed;
    # the OS closes the sockets, and no collective is pending any more.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_errors(error_dir: str) -> str:
    """The ranks' tracebacks, earliest first (the first is the root cause;
    later ones are usually peers losing their connection)."""
    names = sorted(os.listdir(error_dir))
    parts = []
    for name in names:
        rank = name.rsplit("_", 1)[1].removesuffix(".txt")
        with open(os.path.join(error_dir, name)) as fh:
            parts.append(f"---- {rank} ----\n{fh.read()}")
    return "\n".join(parts)


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = RUN_TIMEOUT_S) -> None:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # A stale FileStore file hangs init: use a fresh name per run, removed after.
    fd, store_path = tempfile.mkstemp(prefix="torchopt_ext_store_")
    os.close(fd)
    os.unlink(store_path)
    error_dir = tempfile.mkdtemp(prefix="torchopt_ext_rank_errors_")
    name = getattr(fn, "__name__", repr(fn))
    context = mp.start_processes(
        _worker,
        args=(world_size, store_path, error_dir, fn, args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    try:
        # join() raises (ProcessRaisedException / ProcessExitedException) on the
        # first rank it finds failed and terminates the others; that rank may
        # only be a victim, so report every rank's traceback, earliest first.
        try:
            while not context.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{name} on {world_size} ranks exceeded {timeout} s")
        except ProcessException as e:
            details = _rank_errors(error_dir) or str(e)
            raise RuntimeError(f"{name} failed on {world_size} ranks:\n{details}") from e
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
        if os.path.exists(store_path):
            os.unlink(store_path)
        shutil.rmtree(error_dir, ignore_errors=True)
