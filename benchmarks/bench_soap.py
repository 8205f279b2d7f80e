"""SOAP step time and state memory vs a public SOAP (pytorch-optimizer 4.1.0).

Not a test. Both optimizers run the same gradients on transformer-like
matrices with their default precondition_frequency (10); the reported step
time is the mean over a window of 20 steps (two eigenbasis refreshes included,
so the QR cost is amortized as in training). The two optimizers alternate
over ``--rounds`` rounds and each keeps its best window; the load average is
printed with every row (the machine may be shared). State bytes per param
count every tensor in the optimizer state (GG / Q included).

    python benchmarks/bench_soap.py                    # ~1-2 min on 2 cores
    python benchmarks/bench_soap.py --threads 1,2      # one table per thread count
    python benchmarks/bench_soap.py --quick            # smoke run on small sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

import torch

import torchopt_ext.optim as tox

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    def walk(value) -> int:
        if torch.is_tensor(value):
            return value.numel() * value.element_size()
        if isinstance(value, (list, tuple)):
            return sum(walk(v) for v in value)
        if isinstance(value, dict):
            return sum(walk(v) for v in value.values())
        return 0

    return sum(walk(s) for s in opt.state.values())


def time_steps(make_opt, shapes, window: int, repeats: int) -> tuple[float, int]:
    torch.manual_seed(0)
    params = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    opt = make_opt(params)
    step_index = 0

    def step():
        nonlocal step_index
        for p, g in zip(params, grads[step_index % len(grads)]):
            p.grad = g
        opt.step()
        step_index += 1

    step()  # init-only first call (both libraries)
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(window):
            step()
        best = min(best, (time.perf_counter() - start) / window)
    return best, state_bytes(opt)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", default=None, help="comma-separated intra-op thread counts (default: torch's)")
    parser.add_argument("--rounds", type=int, default=2, help="alternated ours/theirs windows; best kept")
    args = parser.parse_args()
    import pytorch_optimizer  # benchmark dependency (pip install pytorch-optimizer==4.1.0)

    if args.quick:
        configs = {"4 x (64, 64) + (128, 64)": [(64, 64)] * 4 + [(128, 64)]}
        window = 10
    else:
        configs = {
            "8 x (256, 256)": [(256, 256)] * 8,
            "8 x (256, 256) + 2 x (1024, 256)": [(256, 256)] * 8 + [(1024, 256)] * 2,
        }
        window = 20
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else [torch.get_num_threads()]
    rows = []
    table = ""
    for threads in thread_counts:
        torch.set_num_threads(threads)
        table += (
            f"SOAP step (mean of {window} steps incl. refreshes, best of {args.rounds} alternated rounds), "
            f"torch {torch.__version__}, {threads} threads, {datetime.date.today()}\n\n"
            "| matrices | torchopt_ext ms | pytorch_optimizer ms | ratio | state B/param (ours / public) | load avg |\n"
            "|---|---:|---:|---:|---:|---|\n"
        )
        for label, shapes in configs.items():
            n_params = sum(torch.Size(s).numel() for s in shapes)
            ours = public = float("inf")
            load_before = load()
            for _ in range(args.rounds):
                t, ours_bytes = time_steps(lambda ps: tox.SOAP(ps), shapes, window, 1)
                ours = min(ours, t)
                t, public_bytes = time_steps(lambda ps: pytorch_optimizer.SOAP(ps), shapes, window, 1)
                public = min(public, t)
            r = dict(
                threads=threads,
                shapes=label,
                torchopt_ext_ms=ours * 1e3,
                pytorch_optimizer_ms=public * 1e3,
                ratio=ours / public,
                torchopt_ext_state_bytes_per_param=ours_bytes / n_params,
                pytorch_optimizer_state_bytes_per_param=public_bytes / n_params,
                load_average=f"{load_before} -> {load()}",
            )
            rows.append(r)
            table += (
                f"| {r['shapes']} | {r['torchopt_ext_ms']:.2f} | {r['pytorch_optimizer_ms']:.2f} | "
                f"{r['ratio']:.2f}x | {r['torchopt_ext_state_bytes_per_param']:.1f} / "
                f"{r['pytorch_optimizer_state_bytes_per_param']:.1f} | {r['load_average']} |\n"
            )
            print(table.splitlines()[-1], flush=True)
        table += "\n"
    print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    suffix = "_quick" if args.quick else ""
    (RESULTS_DIR / f"soap{suffix}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS_DIR / f"soap{suffix}.md").write_text(table)


if __name__ == "__main__":
    main()
