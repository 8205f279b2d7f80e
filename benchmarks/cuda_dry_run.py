"""Run benchmarks/bench_cuda.py on the CPU with ``torch.cuda`` faked.

Not a measurement: the figures it prints are CPU timings under GPU labels.
It walks every code path a GPU session's bench phase would take (our rows,
each baseline, eager and compiled, the Newton-Schulz rows, --json /
--markdown) so a Python-level error there shows up here and in CI, not in
the few device minutes a session gets. Two bugs were found this way before
any GPU ran the script (a tensor lr refused with foreach=True, and compiled
baselines falling back to eager at dynamo's recompile limit).

What is faked: ``torch.cuda.is_available`` answers True to bench_cuda's own
check (the truth afterwards: dynamo asks too), ``device="cuda"`` in tensor
factories and ``torch.Generator`` becomes the CPU, CUDA events time with
``perf_counter``, and bench_cuda's check for CUDA kernels passes (the CPU ops
run instead).

    python benchmarks/cuda_dry_run.py --params 2e5 --tensors 12 --iters 1 --repeats 1 --warmup 1
"""

from __future__ import annotations

import functools
import sys
import time
from pathlib import Path

import torch
import torch._inductor.compile_fx  # noqa: F401  (imported before torch.Generator is replaced)
import torch.distributed.tensor  # noqa: F401  (likewise: its annotations use torch.Generator)

import torchopt_ext.optim  # noqa: F401

_FACTORIES = ("empty", "full", "ones", "rand", "randn", "randn_like", "tensor", "zeros", "zeros_like")


def _on_cpu(kwargs: dict) -> dict:
    if str(kwargs.get("device", "")).startswith("cuda"):
        kwargs["device"] = "cpu"
    return kwargs


class _Event:
    """torch.cuda.Event's timing interface on the host clock."""

    def __init__(self, enable_timing: bool = False) -> None:
        self.at = 0.0

    def record(self, stream=None) -> None:
        self.at = time.perf_counter()

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _Event) -> float:
        return (end.at - self.at) * 1e3


def fake_cuda() -> None:
    for name in _FACTORIES:
        real = getattr(torch, name)
        setattr(torch, name, functools.wraps(real)(lambda *a, _real=real, **k: _real(*a, **_on_cpu(k))))
    cpu_generator = torch.Generator

    class _Generator(cpu_generator):
        def __new__(cls, device="cpu"):
            return cpu_generator(device="cpu")

    torch.Generator = _Generator
    real_available = torch.cuda.is_available
    asked = []

    def available() -> bool:
        asked.append(True)
        return len(asked) == 1 or real_available()

    torch.cuda.is_available = available
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Event = _Event
    torch.cuda.get_device_name = lambda *a: "CPU (cuda_dry_run: not a GPU measurement)"
    torch.cuda.empty_cache = lambda: None


def main() -> int:
    fake_cuda()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_cuda

    bench_cuda.has_cuda_kernels = lambda: True
    sys.argv = ["bench_cuda.py", *sys.argv[1:]]
    return bench_cuda.main()


if __name__ == "__main__":
    sys.exit(main())
