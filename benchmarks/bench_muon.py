"""Muon and its Newton-Schulz core, measured side by side in one run.

Not a test. Two tables:

1. Newton-Schulz throughput: FLOP/s of ``torch.ops.torchopt_ext.newton_schulz``
   (5 quintic iterations) on 1024x1024 and 1024x4096 matrices, as a fraction of
   this machine's matmul rate measured in the same run and dtype (the
   iteration is matmul-bound: per iteration 4 m^2 n + 2 m^3 FLOPs for an
   m x n input with m <= n).
2. Optimizer step: ``torchopt_ext.optim.Muon`` vs ``torch.optim.Muon`` on a set
   of transformer-like matrices, with the state bytes per parameter; also
   ``torchopt_ext.optim.PRISM`` (default: fp32 shaping on the augmented
   ``[M, gamma D]``, Newton-Schulz on a matrix with twice the input features)
   against Muon with the same fp32 iteration.
3. PRISM / Muon (both fp32 iterations) per matrix shape: square, wide and tall.
4. MARS with ``mars_type="mars-shampoo"`` (Newton-Schulz of the variance-reduced
   momentum) vs pytorch-optimizer's ``MARS(mars_type="shampoo")`` on the
   matrices of table 2 (skipped, saying so, when pytorch-optimizer is missing).

    python benchmarks/bench_muon.py            # ~2 min on 2 cores
    python benchmarks/bench_muon.py --quick    # smoke run on small sizes
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

import torchopt_ext

RESULTS_DIR = Path(__file__).resolve().parent / "results"
COEFFS = [3.4445, -4.775, 2.0315]


def best_median(fn: Callable[[], object], warmup: int, steps: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        best = min(best, statistics.median(times))
    return best


def ns_rows(sizes, dtypes, args) -> list[dict]:
    rows = []
    for m, n in sizes:
        for dtype in dtypes:
            x = torch.randn(m, n)
            ns_flops = 5 * (4 * m * m * n + 2 * m**3)

            def orthogonalize(x=x, dtype=dtype):
                return torch.ops.torchopt_ext.newton_schulz(x, coefficients=COEFFS, steps=5, dtype=dtype)

            ns_time = best_median(
                orthogonalize,
                args.warmup,
                args.steps,
                args.repeats,
            )
            a, b = torch.randn(m, n, dtype=dtype), torch.randn(n, m, dtype=dtype)
            mm_time = best_median(lambda a=a, b=b: torch.mm(a, b), args.warmup, args.steps, args.repeats)
            mm_flops = 2 * m * n * m
            rows.append(
                {
                    "shape": f"{m}x{n}",
                    "dtype": str(dtype).replace("torch.", ""),
                    "ns_gflops": ns_flops / ns_time / 1e9,
                    "matmul_gflops": mm_flops / mm_time / 1e9,
                    "fraction_of_matmul": (ns_flops / ns_time) / (mm_flops / mm_time),
                }
            )
    return rows


def step_rows(shapes, args) -> list[dict]:
    def make(shapes_):
        torch.manual_seed(0)
        params = [torch.randn(s) for s in shapes_]
        for p in params:
            p.grad = torch.randn_like(p)
        return params

    impls = {
        "torchopt_ext.optim.Muon": lambda ps: torchopt_ext.optim.Muon(ps, lr=0.02),
        "torch.optim.Muon": lambda ps: torch.optim.Muon(ps, lr=0.02),
        "torchopt_ext.optim.Muon (ns_dtype=float32)": lambda ps: torchopt_ext.optim.Muon(
            ps, lr=0.02, ns_dtype=torch.float32
        ),
        "torchopt_ext.optim.PRISM": lambda ps: torchopt_ext.optim.PRISM(ps, lr=0.02),
    }
    best = {}
    state_bytes = {}
    for _ in range(args.repeats):
        for label, factory in impls.items():
            params = make(shapes)
            opt = factory(params)
            best[label] = min(best.get(label, float("inf")), best_median(opt.step, args.warmup, args.steps, 1))
            state_bytes[label] = sum(
                t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)
            )
    n_params = sum(torch.Size(s).numel() for s in shapes)
    ours = best["torchopt_ext.optim.Muon"]
    return [
        {
            "implementation": label,
            "ms_per_step": seconds * 1e3,
            "torchopt_ext_time_ratio": ours / seconds,
            "time_over_muon_fp32": seconds / best["torchopt_ext.optim.Muon (ns_dtype=float32)"],
            "state_bytes_per_param": state_bytes[label] / n_params,
        }
        for label, seconds in best.items()
    ]


def prism_shape_rows(width, args) -> list[dict]:
    """PRISM step time over Muon's (both fp32 iterations), one matrix at a time."""
    rows = []
    for label, shape in (
        ("square", (width, width)),
        ("wide (out < in)", (width, 4 * width)),
        ("tall (out > in)", (4 * width, width)),
    ):
        times = {}
        for name, factory in (
            ("muon", lambda ps: torchopt_ext.optim.Muon(ps, lr=0.02, ns_dtype=torch.float32)),
            ("prism", lambda ps: torchopt_ext.optim.PRISM(ps, lr=0.02)),
        ):
            torch.manual_seed(0)
            p = torch.randn(shape)
            p.grad = torch.randn_like(p)
            opt = factory([p])
            times[name] = best_median(opt.step, args.warmup, args.steps, args.repeats)
        rows.append(
            {
                "shape": label,
                "size": "x".join(map(str, shape)),
                "muon_ms": times["muon"] * 1e3,
                "prism_ms": times["prism"] * 1e3,
                "ratio": times["prism"] / times["muon"],
            }
        )
    return rows


def mars_shampoo_rows(shapes, args) -> list[dict]:
    """torchopt_ext's MARS-Shampoo step vs pytorch-optimizer's (both bf16 Newton-Schulz)."""
    try:
        import pytorch_optimizer
    except ImportError:
        print("pytorch-optimizer not installed: no MARS-Shampoo baseline (pip install pytorch-optimizer)")
        return []
    impls = {
        "torchopt_ext.optim.MARS": lambda ps: torchopt_ext.optim.MARS(ps, lr=1e-3, mars_type="mars-shampoo"),
        "pytorch_optimizer.MARS": lambda ps: pytorch_optimizer.MARS(ps, lr=1e-3, mars_type="shampoo"),
    }
    best = {}
    for _ in range(args.repeats):  # alternate the implementations between rounds
        for label, factory in impls.items():
            torch.manual_seed(0)
            params = [torch.randn(s) for s in shapes]
            for p in params:
                p.grad = torch.randn_like(p)
            opt = factory(params)
            best[label] = min(best.get(label, float("inf")), best_median(opt.step, args.warmup, args.steps, 1))
    ours = best["torchopt_ext.optim.MARS"]
    return [
        {"implementation": label, "ms_per_step": seconds * 1e3, "time_ratio": ours / seconds}
        for label, seconds in best.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.repeats = 2, 1, 1
    ns_sizes = [(256, 256), (256, 1024)] if args.quick else [(1024, 1024), (1024, 4096)]
    dtypes = [torch.float32, torch.bfloat16]
    width = 128 if args.quick else 512
    # Four transformer blocks: attention (4 x d^2) and MLP (d x 4d, 4d x d).
    step_shapes = [(width, width)] * 16 + [(4 * width, width), (width, 4 * width)] * 4
    ns = ns_rows(ns_sizes, dtypes, args)
    steps = step_rows(step_shapes, args)
    prism = prism_shape_rows(width, args)
    mars = mars_shampoo_rows(step_shapes, args)
    stamp = (
        f"Command: `python benchmarks/bench_muon.py{' --quick' if args.quick else ''}`  \n"
        f"Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, best of {args.repeats} round(s) of the median of {args.steps} calls.\n\n"
    )
    table = stamp + "| Newton-Schulz (5 it.) | dtype | GFLOP/s | matmul GFLOP/s | fraction of matmul |\n"
    table += "|---|---|--:|--:|--:|\n"
    table += "".join(
        f"| {r['shape']} | {r['dtype']} | {r['ns_gflops']:.1f} | {r['matmul_gflops']:.1f} | "
        f"{r['fraction_of_matmul']:.2f} |\n"
        for r in ns
    )
    n_params = sum(torch.Size(s).numel() for s in step_shapes)
    table += f"\nMuon step, {len(step_shapes)} matrices ({n_params / 1e6:.1f}M params, width {width}):\n\n"
    table += (
        "| implementation | ms/step | torchopt_ext Muon time / this | this / Muon (fp32 NS) | state bytes / param |\n"
        "|---|--:|--:|--:|--:|\n"
    )
    table += "".join(
        f"| {r['implementation']} | {r['ms_per_step']:.1f} | {r['torchopt_ext_time_ratio']:.2f} | "
        f"{r['time_over_muon_fp32']:.2f} | {r['state_bytes_per_param']:.1f} |\n"
        for r in steps
    )
    table += "\nPRISM step / Muon step (both fp32 iterations), one matrix:\n\n"
    table += "| shape | size | Muon ms | PRISM ms | PRISM / Muon |\n|---|---|--:|--:|--:|\n"
    table += "".join(
        f"| {r['shape']} | {r['size']} | {r['muon_ms']:.1f} | {r['prism_ms']:.1f} | {r['ratio']:.2f} |\n" for r in prism
    )
    if mars:
        table += f"\nMARS-Shampoo step, the {len(step_shapes)} matrices above:\n\n"
        table += "| implementation | ms/step | torchopt_ext time / this |\n|---|--:|--:|\n"
        table += "".join(f"| {r['implementation']} | {r['ms_per_step']:.1f} | {r['time_ratio']:.2f} |\n" for r in mars)
    print(table)
    RESULTS_DIR.mkdir(exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (RESULTS_DIR / f"muon{suffix}.json").write_text(
        json.dumps({"newton_schulz": ns, "step": steps, "prism": prism, "mars_shampoo": mars}, indent=1)
    )
    (RESULTS_DIR / f"muon{suffix}.md").write_text(table)


if __name__ == "__main__":
    main()
