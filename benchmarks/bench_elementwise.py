"""Side-by-side step timer for the element-wise family: torchopt_ext's NAdamW, RAdam, QHAdamW
Lion, MARS, LAMB, Adafactor, SophiaG and SophiaH against what users run today (torch.optim's
foreach and single-tensor paths, qhoptim, lion-pytorch, pytorch-optimizer, sophia-opt, transformers'
Adafactor when it is importable), plus SGD and AdamW against torch.optim for reference. The baselines
are optional imports: ``pip install qhoptim lion-pytorch pytorch-optimizer sophia-opt``.

Not a test. Workloads are the foundation benchmark's ``mixed-200`` (200 fp32 tensors of mixed,
odd sizes, ~20M parameters) and a single 16M-parameter tensor. Every optimizer runs in this one
process, interleaved round-robin over ``--repeats`` rounds; a round times ``--steps`` steps after
``--warmup`` (state allocation is never timed) and the figure is the best round's median step.
Adafactor factors matrices, so it runs on its own ``matrices-mixed`` workload (transformer-like
weight matrices plus bias vectors, ~20M parameters); a line per implementation gives its state
bytes per parameter.

    python benchmarks/bench_elementwise.py            # full run, writes results/elementwise.{json,md}
    python benchmarks/bench_elementwise.py --quick    # smoke run on small sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

import torchopt_ext

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def mixed_sizes(total: int, count: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=gen) ** 3 + 0.01
    sizes = (weights / weights.sum() * total).long().clamp(min=1) | 1  # odd sizes
    return sizes.tolist()


def make_params(sizes: list[int]) -> list[torch.Tensor]:
    params = []
    for n in sizes:
        p = torch.randn(n)
        p.grad = torch.randn(n)
        params.append(p)
    return params


def matrix_shapes(scale: float) -> list[tuple[int, ...]]:
    """Transformer-like blocks: 4 attention and 2 MLP matrices per layer, with biases."""
    width = max(16, int(768 * scale**0.5))
    shapes: list[tuple[int, ...]] = []
    for _ in range(4):
        shapes += [(width, width)] * 4 + [(4 * width, width), (width, 4 * width)]
        shapes += [(width,)] * 5 + [(4 * width,)]
    return shapes


def make_shaped_params(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    params = []
    for shape in shapes:
        p = torch.randn(shape)
        p.grad = torch.randn(shape)
        params.append(p)
    return params


def adafactor_baselines() -> list[tuple[str, Callable]]:
    tox = torchopt_ext.optim
    entries = [
        ("torchopt_ext", lambda ps: tox.Adafactor(ps)),
        ("torch foreach", lambda ps: torch.optim.Adafactor(ps, foreach=True)),
        ("torch single-tensor", lambda ps: torch.optim.Adafactor(ps, foreach=False)),
    ]
    try:
        import transformers.optimization

        # The same schedule: relative step with the 1e-2 cap, parameter scaling.
        entries.append(("transformers", lambda ps: transformers.optimization.Adafactor(ps, lr=None)))
    except ImportError:
        print("transformers not importable: Adafactor has no transformers row")
    return entries


def state_bytes_per_param(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> float:
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value) and key != "step":
                total += value.numel() * value.element_size()
    return total / sum(p.numel() for p in params)


def baselines() -> dict[str, list[tuple[str, Callable]]]:
    """Per algorithm: (label, factory) pairs, torchopt_ext first."""
    tox = torchopt_ext.optim
    table: dict[str, list[tuple[str, Callable]]] = {
        "SGD": [
            ("torchopt_ext", lambda ps: tox.SGD(ps, lr=1e-3, momentum=0.9)),
            ("torch foreach", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, foreach=True)),
            ("torch fused", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True)),
        ],
        "AdamW": [
            ("torchopt_ext", lambda ps: tox.AdamW(ps)),
            ("torch foreach", lambda ps: torch.optim.AdamW(ps, foreach=True)),
            ("torch fused", lambda ps: torch.optim.AdamW(ps, fused=True)),
            # Magma (norm pre-pass + masked update): its cost over plain AdamW.
            ("torchopt_ext use_magma", lambda ps: tox.AdamW(ps, use_magma=True, seed=0)),
        ],
        "NAdamW": [
            ("torchopt_ext", lambda ps: tox.NAdamW(ps)),
            ("torch foreach", lambda ps: torch.optim.NAdam(ps, weight_decay=1e-2, decoupled_weight_decay=True)),
            (
                "torch single-tensor",
                lambda ps: torch.optim.NAdam(ps, weight_decay=1e-2, decoupled_weight_decay=True, foreach=False),
            ),
        ],
        "RAdam": [
            ("torchopt_ext", lambda ps: tox.RAdam(ps)),
            ("torch foreach", lambda ps: torch.optim.RAdam(ps, foreach=True)),
            ("torch single-tensor", lambda ps: torch.optim.RAdam(ps, foreach=False)),
        ],
    }
    try:
        import qhoptim.pyt as qhoptim

        table["QHAdamW"] = [
            ("torchopt_ext", lambda ps: tox.QHAdamW(ps, nus=(0.7, 1.0))),
            ("qhoptim", lambda ps: qhoptim.QHAdamW(ps, nus=(0.7, 1.0))),
        ]
    except ImportError:
        print("qhoptim not installed: QHAdamW has no baseline row (pip install qhoptim)")
    try:
        import lion_pytorch

        table["Lion"] = [
            ("torchopt_ext", lambda ps: tox.Lion(ps)),
            ("lion-pytorch", lambda ps: lion_pytorch.Lion(ps)),
        ]
    except ImportError:
        print("lion-pytorch not installed: Lion has no baseline row (pip install lion-pytorch)")
    try:
        import pytorch_optimizer

        # Shapes as in the foundation benchmark are 1-D, so benchmark the
        # MARS branch itself: optimize_1d=True in both.
        table["MARS"] = [
            ("torchopt_ext", lambda ps: tox.MARS(ps, optimize_1d=True)),
            ("pytorch_optimizer", lambda ps: pytorch_optimizer.MARS(ps, optimize_1d=True)),
        ]
        # timm's Lamb (the usual reference) needs torchvision; pytorch-optimizer's Lamb
        # is the pure-PyTorch alternative people install.
        table["LAMB"] = [
            ("torchopt_ext", lambda ps: tox.LAMB(ps)),
            ("pytorch_optimizer", lambda ps: pytorch_optimizer.Lamb(ps, weight_decay=0.01, max_grad_norm=1.0)),
        ]
    except ImportError:
        print("pytorch-optimizer not installed: MARS has no baseline row (pip install pytorch-optimizer)")
    try:
        import sophia_opt

        # The step only (h = 0 here; the refresh is a separate call in both).
        table["SophiaG"] = [
            ("torchopt_ext", lambda ps: tox.SophiaG(ps, seed=0)),
            ("sophia-opt (official)", lambda ps: sophia_opt.SophiaG(ps)),
        ]
    except ImportError:
        print("sophia-opt not installed: SophiaG has no baseline row (pip install sophia-opt)")
    try:
        import pytorch_optimizer

        # Its step refreshes the Hessian itself on step 1, k+1, ...: with params that do not
        # require grad that refresh finds nothing to do, so the rows time the update alone
        # (the refresh step is in the untimed warmup).
        table["SophiaH"] = [
            ("torchopt_ext", lambda ps: tox.SophiaH(ps, seed=0)),
            ("pytorch_optimizer", lambda ps: pytorch_optimizer.SophiaH(ps, update_period=10**9)),
        ]
    except ImportError:
        pass
    return table


def time_steps(opt: torch.optim.Optimizer, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round")
    parser.add_argument("--only", nargs="+", metavar="ALGO", help="time only these algorithms (e.g. SophiaG)")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 3, 1
    scale = 1 / 64 if args.quick else 1
    workloads = {
        "mixed-200": mixed_sizes(int(20_000_000 * scale), 200),
        "one-16M": [int(16 * 2**20 * scale) | 1],
    }
    only = set(args.only or [])
    warnings.simplefilter("ignore")  # qhoptim's deprecated add_ overloads
    rows = []
    for workload, sizes in workloads.items():
        for algo, entries in baselines().items():
            if only and algo not in only:
                continue
            best: dict[str, float] = {}
            for _ in range(args.repeats):
                for label, factory in entries:
                    params = make_params(sizes)
                    median = time_steps(factory(params), args.warmup, args.steps)
                    best[label] = min(best.get(label, float("inf")), median)
                    del params
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
                    }
                )
    # Adafactor on matrices (its factored path), with the state footprint.
    entries = adafactor_baselines() if not only or "Adafactor" in only else []
    shapes = matrix_shapes(scale)
    n_params = sum(torch.Size(shape).numel() for shape in shapes)
    best: dict[str, float] = {}
    state_bytes: dict[str, float] = {}
    for _ in range(args.repeats):
        for label, factory in entries:
            params = make_shaped_params(shapes)
            opt = factory(params)
            median = time_steps(opt, args.warmup, args.steps)
            best[label] = min(best.get(label, float("inf")), median)
            state_bytes[label] = state_bytes_per_param(opt, params)
            del params, opt
    for label, seconds in best.items():
        rows.append(
            {
                "workload": "matrices-mixed",
                "params": n_params,
                "algorithm": "Adafactor",
                "implementation": label,
                "ms_per_step": seconds * 1e3,
                "torchopt_ext_time_ratio": best["torchopt_ext"] / seconds,
                "state_bytes_per_param": state_bytes[label],
            }
        )
    header = (
        f"Command: `python benchmarks/bench_elementwise.py{' --quick' if args.quick else ''}"
        f"{' --only ' + ' '.join(args.only) if args.only else ''}`  \n"
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats} round(s) of the median of {args.steps} steps.  \n"
        "Last column: torchopt_ext's step time divided by this row's (below 1: torchopt_ext is faster).\n\n"
        "| workload | algorithm | implementation | ms/step | torchopt_ext time / this |\n|---|---|---|--:|--:|\n"
    )
    table = header + "".join(
        f"| {r['workload']} ({r['params'] / 1e6:.1f}M) | {r['algorithm']} | {r['implementation']} | "
        f"{r['ms_per_step']:.2f} | {r['torchopt_ext_time_ratio']:.2f} |\n"
        for r in rows
    )
    table += (
        "\nAdafactor state (param-shaped or factored tensors, not the step counters), bytes per param: "
        + ", ".join(
            f"{r['implementation']} {r['state_bytes_per_param']:.3f}" for r in rows if "state_bytes_per_param" in r
        )
        + "\n"
    )
    print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    suffix = ("-quick" if args.quick else "") + ("-" + "-".join(args.only) if args.only else "")
    (RESULTS_DIR / f"elementwise{suffix}.json").write_text(json.dumps(rows, indent=1))
    (RESULTS_DIR / f"elementwise{suffix}.md").write_text(table)


if __name__ == "__main__":
    main()
