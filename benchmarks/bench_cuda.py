"""Bandwidth of the CUDA element-wise kernels (csrc/kernels/cuda/).

Not a test, and GPU-only: it exits with a message when torch sees no CUDA
device. For each optimizer it times one step over ~200 tensors of mixed, odd
sizes (``--params`` in total, 100M by default; the issue's range is 100M-1B),
converts the bytes a fused step must move (params and state read and
written, grads read) into GB/s, and divides by the bandwidth of a
device-to-device copy measured in the same run (the practical HBM peak).
Baselines on the same tensors: torch.optim's fused and foreach AdamW/Adam/SGD,
torch.compile of torch.optim's foreach step, and lion-pytorch when installed.

Then Newton-Schulz (``torchopt_ext::newton_schulz``, 5 bf16 quintic steps)
on 4096x4096 and 8192x2048 inputs: TFLOP/s as a fraction of the same GPU's
bf16 GEMM rate (8192^3 matmul) measured in the same run.

    python benchmarks/bench_cuda.py                     # 100M params, fp32
    python benchmarks/bench_cuda.py --params 1e9 --dtype bf16
    python benchmarks/bench_cuda.py --newton-schulz-only
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import torchopt_ext.optim as tox

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
}


def baselines():
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
    }
    compiled = {
        "torch.compile AdamW foreach": (
            "AdamW",
            lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(1e-3, device="cuda"), weight_decay=0.01, foreach=True),
        ),
        "torch.compile RAdam foreach": ("RAdam", lambda ps: torch.optim.RAdam(ps, lr=1e-3, foreach=True)),
    }
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


def newton_schulz_rates(warmup: int, iters: int, repeats: int) -> None:
    """TFLOP/s of bf16 Newton-Schulz vs a bf16 GEMM on this GPU."""
    n = 8192
    lhs = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    rhs = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    gemm = 2 * n**3 / time_step(lambda: lhs @ rhs, warmup, iters, repeats)
    print(f"bf16 GEMM {n}^3: {gemm / 1e12:.0f} TFLOP/s")
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=1e8)
    parser.add_argument("--tensors", type=int, default=200)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--newton-schulz-only", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda.py needs a CUDA device: torch.cuda.is_available() is False. Nothing was measured.")
        return 2
    if args.newton_schulz_only:
        newton_schulz_rates(args.warmup, args.iters, args.repeats)
        return 0
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    sizes = mixed_sizes(int(args.params), args.tensors)
    numel = sum(sizes)
    elem = torch.tensor([], dtype=dtype).element_size()
    print(f"{torch.cuda.get_device_name()}: {len(sizes)} tensors, {numel / 1e6:.1f}M params, {args.dtype}")
    copy_bw = copy_bandwidth(numel * 4, args.warmup, args.iters, args.repeats)
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")

    def params():
        gen = torch.Generator(device="cuda").manual_seed(0)
        ps = []
        for n in sizes:
            p = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
            p.grad = torch.randn(n, device="cuda", dtype=dtype, generator=gen) * 1e-3
            ps.append(p)
        return ps

    def report(label, state_count, seconds):
        # params r+w, grads r, state r+w (fp32 state for bf16 params: state in the param dtype here)
        nbytes = numel * elem * (2 + 1 + 2 * state_count)
        bw = nbytes / seconds
        print(f"{label:32s} {seconds * 1e3:8.3f} ms  {bw / 1e9:7.0f} GB/s  {bw / copy_bw:6.1%} of copy")

    timings = {}
    for name, (make, states) in TOX.items():
        ps = params()
        opt = make(ps)
        timings[name] = time_step(opt.step, args.warmup, args.iters, args.repeats)
        report(f"torchopt_ext {name}", states, timings[name])
        del opt, ps
        torch.cuda.empty_cache()
    eager, compiled = baselines()
    for label, (algo, make) in {**eager, **compiled}.items():
        ps = params()
        opt = make(ps)
        step = torch.compile(opt.step) if label in compiled else opt.step
        seconds = time_step(step, args.warmup + (2 if label in compiled else 0), args.iters, args.repeats)
        report(label, TOX[algo][1], seconds)
        print(f"{'':32s} torchopt_ext {algo} is {seconds / timings[algo]:.2f}x faster")
        del opt, ps, step
        torch.cuda.empty_cache()
    newton_schulz_rates(args.warmup, args.iters, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
