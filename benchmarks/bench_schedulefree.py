"""Step timer for torchopt_ext's fused ScheduleFreeAdamW / ScheduleFreeSGD against the
schedulefree package's AdamWScheduleFree / SGDScheduleFree (their foreach paths), plus the
optimizer state each keeps, in bytes per parameter. Needs ``pip install schedulefree==1.4.1``.

Not a test. Workloads are bench_elementwise.py's (``mixed-200``: 200 fp32 tensors of mixed odd
sizes, ~20M parameters; ``one-16M``: one 16M-parameter tensor). Implementations are interleaved
round-robin over ``--repeats`` rounds; a round times ``--steps`` steps after ``--warmup`` and the
figure is the best round's median step. The package overwrites ``p.grad`` with its update
direction, so every step (of both) starts from the same gradients, restored outside the timing.

    python benchmarks/bench_schedulefree.py            # full run, writes results/schedulefree.{json,md}
    python benchmarks/bench_schedulefree.py --quick    # smoke run on small sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import schedulefree
import torch
from bench_elementwise import make_params, mixed_sizes

import torchopt_ext

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def implementations() -> dict[str, list[tuple[str, Callable]]]:
    tox = torchopt_ext.optim
    return {
        "ScheduleFreeAdamW": [
            ("torchopt_ext", lambda ps: tox.ScheduleFreeAdamW(ps, lr=1e-3, weight_decay=0.01, warmup_steps=100)),
            (
                "schedulefree foreach",
                lambda ps: schedulefree.AdamWScheduleFree(ps, lr=1e-3, weight_decay=0.01, warmup_steps=100),
            ),
        ],
        "ScheduleFreeSGD": [
            ("torchopt_ext", lambda ps: tox.ScheduleFreeSGD(ps, lr=1e-2, weight_decay=0.01, warmup_steps=100)),
            (
                "schedulefree foreach",
                lambda ps: schedulefree.SGDScheduleFree(ps, lr=1e-2, weight_decay=0.01, warmup_steps=100),
            ),
        ],
    }


def state_bytes_per_param(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    total = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return total / sum(p.numel() for p in params)


def time_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], warmup: int, steps: int) -> float:
    saved = [p.grad.clone() for p in params]
    opt.train()

    def step() -> float:
        for p, g in zip(params, saved):
            p.grad.copy_(g)
        start = time.perf_counter()
        opt.step()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    return statistics.median(step() for _ in range(steps))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 5, 1
    scale = 1 / 64 if args.quick else 1
    workloads = {
        "mixed-200": mixed_sizes(int(20_000_000 * scale), 200),
        "one-16M": [int(16 * 2**20 * scale) | 1],
    }
    rows = []
    for workload, sizes in workloads.items():
        for algo, entries in implementations().items():
            best: dict[str, float] = {}
            state_bytes: dict[str, float] = {}
            for _ in range(args.repeats):
                for label, factory in entries:
                    params = make_params(sizes)
                    opt = factory(params)
                    median = time_steps(opt, params, args.warmup, args.steps)
                    best[label] = min(best.get(label, float("inf")), median)
                    state_bytes[label] = state_bytes_per_param(opt, params)
                    del opt, params
            ours = best["torchopt_ext"]
            for label, seconds in best.items():
                rows.append(
                    {
                        "workload": workload,
                        "params": sum(sizes),
                        "algorithm": algo,
                        "implementation": label,
                        "ms_per_step": seconds * 1e3,
                        "torchopt_ext_time_ratio": ours / seconds,
                        "state_bytes_per_param": state_bytes[label],
                    }
                )
    load = os.getloadavg()
    header = (
        f"Command: `python benchmarks/bench_schedulefree.py{' --quick' if args.quick else ''}`  \n"
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
        f"on {os.cpu_count()} CPUs, best of {args.repeats} round(s) of the median of {args.steps} steps.  \n"
        "torchopt_ext time / this: below 1 means torchopt_ext is faster. State: bytes of optimizer state "
        "per parameter (fp32 params).\n\n"
        "| workload | algorithm | implementation | ms/step | torchopt_ext time / this | state B/param |\n"
        "|---|---|---|--:|--:|--:|\n"
    )
    table = header + "".join(
        f"| {r['workload']} ({r['params'] / 1e6:.1f}M) | {r['algorithm']} | {r['implementation']} | "
        f"{r['ms_per_step']:.2f} | {r['torchopt_ext_time_ratio']:.2f} | {r['state_bytes_per_param']:.3f} |\n"
        for r in rows
    )
    print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS_DIR / f"schedulefree{suffix}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS_DIR / f"schedulefree{suffix}.md").write_text(table)


if __name__ == "__main__":
    main()
