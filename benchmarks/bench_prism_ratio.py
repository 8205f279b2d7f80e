"""PRISM step over Muon step (both fp32 Newton-Schulz), robust to a busy
machine: the two optimizers alternate and each keeps its fastest call.

    python benchmarks/bench_prism_ratio.py

Flop model of the iteration (5 quintic steps, per step 4 s^2 l + 2 s^3 for an
s x l input, s <= l): PRISM orthogonalizes the (out, 2 in) matrix [M, gamma D],
so square n x n costs 10 n^3 vs Muon's 6 n^3 (1.67x), wide n x 4n 34 vs 18
(1.9x), tall 4n x n 80 vs 18 (4.4x: the augmentation doubles the small side).
"""

import time

import torch

import torchopt_ext.optim as tox


def make(shapes):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def main() -> None:
    torch.set_num_threads(1)
    w = 256
    sets = {
        f"square {w}x{w}": [(w, w)],
        f"wide {w}x{4 * w}": [(w, 4 * w)],
        f"tall {4 * w}x{w}": [(4 * w, w)],
        f"24-matrix set (width {w})": [(w, w)] * 16 + [(4 * w, w), (w, 4 * w)] * 4,
    }
    print("| matrices | Muon ms (fp32 NS) | PRISM ms | PRISM / Muon |\n|---|--:|--:|--:|")
    for name, shapes in sets.items():
        muon = tox.Muon(make(shapes), lr=0.02, ns_dtype=torch.float32)
        prism = tox.PRISM(make(shapes), lr=0.02)
        t_muon = t_prism = float("inf")
        for _ in range(3 if len(shapes) > 3 else 15):
            start = time.perf_counter()
            muon.step()
            t_muon = min(t_muon, time.perf_counter() - start)
            start = time.perf_counter()
            prism.step()
            t_prism = min(t_prism, time.perf_counter() - start)
        print(f"| {name} | {t_muon * 1e3:.1f} | {t_prism * 1e3:.1f} | {t_prism / t_muon:.2f} |", flush=True)


if __name__ == "__main__":
    main()
