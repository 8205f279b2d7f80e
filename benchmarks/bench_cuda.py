"""Bandwidth of the CUDA element-wise kernels (csrc/kernels/cuda/).

Not a test, and GPU-only: it exits (status 2) with a message when torch sees
no CUDA device or torchopt_ext was built without its CUDA kernels. For each
optimizer it times one step over ~200 tensors of mixed, odd sizes
(``--params`` in total, 100M by default; the issue's range is 100M-1B),
converts the bytes a fused step must move (params and state read and
written, grads read) into GB/s, and divides by the bandwidth of a
device-to-device copy measured in the same run (the practical HBM peak).
Every element-wise algorithm with a CUDA kernel has a row (LAMB, MARS and
Adafactor count one pass although their norm / statistics passes re-read
the inputs; the tensors are 1-D, so Adafactor runs its unfactored path).

Baselines on the same tensors: torch.optim's fused and foreach
AdamW/Adam/SGD, foreach NAdam/RAdam/Adafactor, torch.compile of torch.optim's
foreach steps, and, for the algorithms torch does not ship (QHAdamW, Lion,
SophiaG, LAMB, MARS), multi-tensor steps written from the spec
(benchmarks/spec_references.py, checked against torchopt_ext on the CPU by
tests/python/test_bench_references.py), eager and compiled; lion-pytorch and
schedulefree when installed. Each baseline line says how much faster
torchopt_ext's kernel is.

Then Newton-Schulz (``torchopt_ext::newton_schulz``, 5 bf16 quintic steps)
on 4096x4096 and 8192x2048 inputs: TFLOP/s as a fraction of the same GPU's
bf16 GEMM rate (8192^3 matmul) measured in the same run.

``--json`` / ``--markdown`` write every row; ``--budget SECONDS`` skips the
baselines left when the run has used that much wall time (compiling a
200-tensor foreach step takes tens of seconds), saying which. Dynamo is reset
before each compiled baseline (torch.optim's steps share one wrapper, whose
cache would otherwise hit the recompile limit and run eager). The
schedulefree package keeps Python floats in its param groups that change
every step, so compiled it recompiles until dynamo's limit and then runs
eager: its "torch.compile" row measures what a user of it would get.

    python benchmarks/bench_cuda.py                     # 100M params, fp32
    python benchmarks/bench_cuda.py --params 1e9 --dtype bf16
    python benchmarks/bench_cuda.py --newton-schulz-only
    python benchmarks/bench_cuda.py --json out.json --markdown out.md --budget 240
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import spec_references  # noqa: E402

import torchopt_ext.optim as tox  # noqa: E402

# State tensors per param of each fused step (for the byte count).
TOX = {
    "AdamW": (lambda ps: tox.AdamW(ps, lr=1e-3, weight_decay=0.01), 2),
    "Adam(amsgrad)": (lambda ps: tox.Adam(ps, lr=1e-3, amsgrad=True), 3),
    "SGD(momentum)": (lambda ps: tox.SGD(ps, lr=1e-2, momentum=0.9), 1),
    "NAdamW": (lambda ps: tox.NAdamW(ps, lr=1e-3, weight_decay=0.01), 2),
    "RAdam": (lambda ps: tox.RAdam(ps, lr=1e-3), 2),
    "QHAdamW": (lambda ps: tox.QHAdamW(ps, lr=1e-3, nus=(0.7, 1.0)), 2),
    "Lion": (lambda ps: tox.Lion(ps, lr=1e-4, weight_decay=0.01), 1),
    "SophiaG": (lambda ps: tox.SophiaG(ps, lr=1e-4), 2),
    "ScheduleFreeAdamW": (lambda ps: tox.ScheduleFreeAdamW(ps, lr=1e-3), 2),
    "ScheduleFreeSGD": (lambda ps: tox.ScheduleFreeSGD(ps, lr=1e-2), 1),
    # Bytes counted as for one fused pass; the norm pre-pass re-reads p, g, m, v,
    # so its fraction of copy bandwidth shows what Magma costs.
    "AdamW(magma)": (lambda ps: tox.AdamW(ps, lr=1e-3, weight_decay=0.01, use_magma=True, seed=0), 2),
    # Two-stage kernels (per-tensor norm pass, then the update): bytes of the update pass.
    "LAMB": (lambda ps: tox.LAMB(ps, lr=1e-3, weight_decay=0.01), 2),
    "MARS": (lambda ps: tox.MARS(ps, lr=3e-3, optimize_1d=True), 3),  # m, v, last_grad
    "Adafactor": (lambda ps: tox.Adafactor(ps, lr=1e-2), 1),  # 1-D: one variance per param
}

# The spec-written multi-tensor steps (eager and compiled) for the algorithms
# torch does not ship, with the hyperparameters of the TOX rows.
SPEC_BASELINES = {
    "QHAdamW": dict(lr=1e-3, nus=(0.7, 1.0)),
    "Lion": dict(lr=1e-4, weight_decay=0.01),
    "SophiaG": dict(lr=1e-4),
    "LAMB": dict(lr=1e-3, weight_decay=0.01),
    "MARS": dict(lr=3e-3),
}


def baselines():
    """(eager, compiled): label -> (TOX row it compares with, make(params) ->
    an optimizer or a step callable)."""
    out = {
        "torch AdamW fused": ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, fused=True)),
        "torch AdamW foreach": ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01, foreach=True)),
        "torch Adam(amsgrad) fused": (
            "Adam(amsgrad)",
            lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True, fused=True),
        ),
        "torch SGD(momentum) fused": (
            "SGD(momentum)",
            lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
        ),
        "torch RAdam foreach": ("RAdam", lambda ps: torch.optim.RAdam(ps, lr=1e-3, foreach=True)),
        "torch NAdamW foreach": (
            "NAdamW",
            lambda ps: torch.optim.NAdam(ps, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True, foreach=True),
        ),
        "torch Adafactor foreach": ("Adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True)),
    }
    compiled = {
        # A tensor lr (no recompile when a scheduler changes it), as PyTorch's
        # compiled-optimizer recipe. An explicit foreach=True with a tensor lr
        # is refused at construction unless capturable=True; with foreach=None
        # dynamo sets capturable on CUDA params and the default picks foreach.
        "torch.compile AdamW foreach": (
            "AdamW",
            lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.01),
        ),
        "torch.compile RAdam foreach": ("RAdam", lambda ps: torch.optim.RAdam(ps, lr=1e-3, foreach=True)),
        "torch.compile NAdamW foreach": (
            "NAdamW",
            lambda ps: torch.optim.NAdam(ps, lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True, foreach=True),
        ),
        "torch.compile Adafactor foreach": (
            "Adafactor",
            lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True),
        ),
    }
    for algo, hyper in SPEC_BASELINES.items():
        make = spec_references.REFERENCES[algo]
        out[f"spec foreach {algo}"] = (algo, lambda ps, make=make, hyper=hyper: make(ps, **hyper))
        compiled[f"torch.compile spec foreach {algo}"] = (algo, lambda ps, make=make, hyper=hyper: make(ps, **hyper))
    try:
        import schedulefree

        def package_sf(ps):
            opt = schedulefree.AdamWScheduleFree(ps, lr=1e-3, foreach=True)
            opt.train()  # the package starts in eval mode
            return opt

        out["schedulefree AdamWScheduleFree foreach"] = ("ScheduleFreeAdamW", package_sf)
        compiled["torch.compile schedulefree AdamWScheduleFree"] = ("ScheduleFreeAdamW", package_sf)
    except ImportError:
        print("schedulefree not installed: no Schedule-Free baseline")
    try:
        from lion_pytorch import Lion

        compiled["torch.compile lion-pytorch"] = ("Lion", lambda ps: Lion(ps, lr=1e-4, weight_decay=0.01))
    except ImportError:
        print("lion-pytorch not installed: no Lion baseline")
    return out, compiled


def mixed_sizes(total: int, count: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    weights = torch.rand(count, generator=gen) ** 3 + 0.01
    return ((weights / weights.sum() * total).long().clamp(min=1) | 1).tolist()  # odd sizes


def time_step(step, warmup: int, iters: int, repeats: int) -> float:
    """Best-of-repeats median of per-step times (seconds), CUDA events."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    medians = []
    for _ in range(repeats):
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        medians.append(statistics.median(times))
    return min(medians)


def copy_bandwidth(nbytes: int, warmup: int, iters: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = time_step(lambda: dst.copy_(src), warmup, iters, repeats)
    return 2 * src.numel() * 4 / seconds  # read + write


def newton_schulz_rates(warmup: int, iters: int, repeats: int) -> list[dict]:
    """TFLOP/s of bf16 Newton-Schulz vs a bf16 GEMM on this GPU (rows for --json)."""
    n = 8192
    lhs = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    rhs = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * n**3 / time_step(lambda: lhs @ rhs, warmup, iters, repeats)
    print(f"bf16 GEMM {n}^3: {gemm / 1e12:.0f} TFLOP/s")
    table = [dict(what=f"bf16 GEMM {n}^3", ms=2 * n**3 / gemm * 1e3, TFLOPs=gemm / 1e12, of_gemm=1.0)]
    steps = 5
    for rows, cols in ((4096, 4096), (8192, 2048)):
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        small, large = min(rows, cols), max(rows, cols)
        # Per step: A = X X^T (2 s^2 l), B = bA + cA^2 (2 s^3), X = aX + BX (2 s^2 l).
        flops = steps * (4 * small * small * large + 2 * small**3)
        seconds = time_step(
            lambda x=x: torch.ops.torchopt_ext.newton_schulz(x, steps=steps, dtype=torch.bfloat16),
            warmup,
            iters,
            repeats,
        )
        rate = flops / seconds
        print(
            f"newton_schulz {rows}x{cols} bf16, {steps} steps: {seconds * 1e3:.3f} ms  {rate / 1e12:.0f} TFLOP/s  "
            f"{rate / gemm:.2f} of the GEMM rate"
        )
        table.append(
            dict(
                what=f"newton_schulz {rows}x{cols} bf16, {steps} steps",
                ms=seconds * 1e3,
                TFLOPs=rate / 1e12,
                of_gemm=rate / gemm,
            )
        )
    return table


def has_cuda_kernels() -> bool:
    """Whether this torchopt_ext build registered its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("torchopt_ext::adam_step_", "CUDA")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e8)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--newton-schulz-only", action="store_true")
    parser.add_argument("--json", type=Path, help="write every row here (JSON)")
    parser.add_argument("--markdown", type=Path, help="write the table here (markdown)")
    parser.add_argument("--budget", type=float, default=None, help="skip baselines after this many seconds")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA device: torch.cuda.is_available() is False. Nothing was measured.")
        return 2
    if not has_cuda_kernels():
        print(
            "bench_cuda.py: this torchopt_ext build has no CUDA kernels (built with a CPU torch or "
            "TORCHOPT_EXT_WITH_CUDA=0). Rebuild with a CUDA torch and nvcc. Nothing was measured."
        )
        return 2
    started = time.monotonic()
    results = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rows": [],
        "skipped": [],
    }
    try:
        if args.newton_schulz_only:
            results["newton_schulz"] = newton_schulz_rates(args.warmup, args.iters, args.repeats)
        else:
            elementwise(args, results, started)
            results["newton_schulz"] = newton_schulz_rates(args.warmup, args.iters, args.repeats)
    finally:
        write_outputs(args, results)
    return 0


def elementwise(args, results: dict, started: float) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sizes = mixed_sizes(int(args.params), args.tensors)
    numel = sum(sizes)
    elem = torch.tensor([], dtype=dtype).element_size()
    print(f"{torch.cuda.get_device_name()}: {len(sizes)} tensors, {numel / 1e6:.1f}M params, {args.dtype}")
    copy_bw = copy_bandwidth(numel * 4, args.warmup, args.iters, args.repeats)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    results.update(tensors=len(sizes), params=numel, dtype=args.dtype, copy_GBps=copy_bw / 1e9)

    def params():
        gen = torch.Generator(device="cuda").manual_seed(0)
        ps = []
        for n in sizes:
            p = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
            p.grad = torch.randn(n, device="cuda", dtype=dtype, generator=gen) * 1e-3
            ps.append(p)
        return ps

    def report(label, algo, seconds, ours=None):
        # params r+w, grads r, state r+w (state in the param dtype here)
        nbytes = numel * elem * (2 + 1 + 2 * TOX[algo][1])
        bw = nbytes / seconds
        print(f"{label:40s} {seconds * 1e3:8.3f} ms  {bw / 1e9:7.0f} GB/s  {bw / copy_bw:6.1%} of copy")
        row = dict(label=label, algo=algo, ms=seconds * 1e3, GBps=bw / 1e9, of_copy=bw / copy_bw)
        if ours is not None:
            row["torchopt_ext_speedup"] = seconds / ours
            print(f"{'':40s} torchopt_ext {algo} is {seconds / ours:.2f}x faster")
        results["rows"].append(row)

    timings = {}
    for name, (make, _) in TOX.items():
        ps = params()
        opt = make(ps)
        timings[name] = time_step(opt.step, args.warmup, args.iters, args.repeats)
        report(f"torchopt_ext {name}", name, timings[name])
        del opt, ps
        torch.cuda.empty_cache()
    eager, compiled = baselines()
    for label, (algo, make) in {**eager, **compiled}.items():
        if args.budget is not None and time.monotonic() - started > args.budget:
            print(f"{label:40s} skipped: the --budget of {args.budget:.0f} s is used up")
            results["skipped"].append(label)
            continue
        ps = params()
        made = make(ps)
        step = made.step if hasattr(made, "step") else made
        if label in compiled:
            # torch.optim's steps share one wrapper code object: without a
            # reset its cache fills across baselines and dynamo falls back to
            # eager at the recompile limit (seen in a CPU dry run).
            torch._dynamo.reset()
            step = torch.compile(step)
        seconds = time_step(step, args.warmup + (2 if label in compiled else 0), args.iters, args.repeats)
        report(label, algo, seconds, ours=timings[algo])
        del made, ps, step
        torch.cuda.empty_cache()
    fused = next((r for r in results["rows"] if r["label"] == "torch AdamW fused"), None)
    if fused is not None:
        print(f"torchopt_ext AdamW / torch fused AdamW step time: {timings['AdamW'] * 1e3 / fused['ms']:.3f}")


def write_outputs(args, results: dict) -> None:
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    if args.markdown is not None:
        lines = [f"{results['device']}, torch {results['torch']}"]
        if "copy_GBps" in results:
            lines[0] += (
                f": {results['tensors']} tensors, {results['params'] / 1e6:.1f}M params, {results['dtype']}, "
                f"device-to-device copy {results['copy_GBps']:.0f} GB/s"
            )
        lines += ["", "| step | ms | GB/s | of copy | torchopt_ext faster by |", "|---|---|---|---|---|"]
        for r in results["rows"]:
            speedup = f"{r['torchopt_ext_speedup']:.2f}x" if "torchopt_ext_speedup" in r else ""
            lines.append(f"| {r['label']} | {r['ms']:.3f} | {r['GBps']:.0f} | {r['of_copy']:.1%} | {speedup} |")
        for label in results["skipped"]:
            lines.append(f"| {label} | skipped (time budget) | | | |")
        for r in results.get("newton_schulz") or []:
            lines.append(f"\n{r['what']}: {r['ms']:.3f} ms, {r['TFLOPs']:.0f} TFLOP/s, {r['of_gemm']:.2f} of the GEMM")
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
