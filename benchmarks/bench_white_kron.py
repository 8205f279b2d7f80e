"""WhiteKron (skew / quad) and KronPSGD step time vs our AdamW and kron-torch's
Kron (0.3.3, preconditioner updated every step for equal settings), and
preconditioner memory per parameter (fp32 / bf16 factors).

Not a test. Same gradients for everyone on a transformer-like set of matrices
plus biases; step time is the mean over a window of steps, best of a few
repeats. Timings are only meaningful on an idle machine: the script prints the
1-minute load average and refuses to time (memory only) when it is >= 1.5,
unless --force.

    python benchmarks/bench_white_kron.py            # ~1-2 min on 2 cores
    python benchmarks/bench_white_kron.py --quick    # smoke run on small sizes
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import torchopt_ext.optim as tox

PRECOND_KEYS = ("ql", "qr", "lip_l", "lip_r", "Q")


def precond_bytes_per_param(opt: torch.optim.Optimizer, params) -> float:
    total = 0
    for state in opt.state.values():
        for key, value in state.items():
            if key in PRECOND_KEYS:
                values = value if isinstance(value, (list, tuple)) else [value]
                total += sum(v.numel() * v.element_size() for v in values if torch.is_tensor(v))
    return total / sum(p.numel() for p in params)


def time_steps(make_opt, shapes, window: int, repeats: int):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(4)]
    opt = make_opt(params)
    k = 0

    def step():
        nonlocal k
        for p, g in zip(params, grads[k % len(grads)]):
            p.grad = g
        opt.step()
        k += 1

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(window):
            step()
        best = min(best, (time.perf_counter() - start) / window)
    return best, precond_bytes_per_param(opt, params)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--force", action="store_true", help="time even on a busy machine")
    # kron-torch 0.3.3 without the opt_einsum package contracts through d^4
    # intermediates (20 GB RSS, OOM-killed, on one (512, 128) matrix here), so
    # it is opt-in; with opt_einsum==3.4.0 installed it runs normally
    # (bench_kron.py compares Kron with it and with heavyball).
    parser.add_argument("--with-kron-torch", action="store_true", help="add kron_torch.Kron (see the note)")
    args = parser.parse_args()
    d = 128 if args.quick else 512
    shapes = [(d, d)] * 4 + [(4 * d, d), (d, 4 * d), (d,), (4 * d,)]
    window, repeats = (2, 1) if args.quick else (5, 3)
    load = os.getloadavg()[0]
    timing = load < 1.5 or args.force
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load {load:.2f}, shapes {shapes}")
    if not timing:
        print("load >= 1.5: step times not measured (memory only); rerun on an idle machine or with --force")
    cases = {
        "AdamW (ours)": lambda ps: tox.AdamW(ps, lr=1e-3),
        "KronPSGD": lambda ps: tox.KronPSGD(ps, lr=1e-3),
        "WhiteKron skew fp32": lambda ps: tox.WhiteKron(ps, dtype=torch.float32, seed=0),
        "WhiteKron skew bf16": lambda ps: tox.WhiteKron(ps, dtype=torch.bfloat16, seed=0),
        "WhiteKron quad fp32": lambda ps: tox.Quad(ps, dtype=torch.float32, seed=0),
    }
    if args.with_kron_torch:
        from kron_torch import Kron  # pip install --no-deps kron-torch==0.3.3

        cases["kron_torch.Kron (p=1)"] = lambda ps: Kron(ps, lr=1e-3, preconditioner_update_probability=1.0)
    print("| optimizer | step ms | preconditioner bytes / param |")
    print("|---|---|---|")
    for name, make in cases.items():
        if timing:
            seconds, mem = time_steps(make, shapes, window, repeats)
            ms = f"{seconds * 1e3:.1f}"
        else:
            _, mem = time_steps(make, shapes, 0, 0)
            ms = "not measured"
        print(f"| {name} | {ms} | {mem:.2f} |")


if __name__ == "__main__":
    main()
