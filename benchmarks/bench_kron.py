"""Kron step time vs kron-torch's Kron (the public PyTorch PSGD Kron,
`pip install --no-deps kron-torch==0.3.3`) at equal settings, and the
preconditioner memory per parameter. The optimizers alternate and each keeps
its fastest call, so a busy machine hurts both alike.

    python benchmarks/bench_kron.py

Equal settings: update probability 1 (every step updates the factors), init
scale 1, no dim merging (kron-torch's merge_dims=False), fp32 factors, one
thread. kron-torch's geometry is the triangular EQ-style update, so it is
compared with Kron(preconditioner_mode="EQ") and with the default
"Q0.5EQ1.5". heavyball's PSGDKron is not measured (not installed here).
kron-torch wraps its einsums in @torch.compile; the comparison runs both
eagerly (dynamo disabled). Small shapes only: without the opt_einsum package
(not installed in this environment) torch.einsum contracts kron-torch's
expressions left to right, through the outer product of the factors
(d^4 elements for a d x d matrix: 275 GB at 512 x 512), so larger layers do
not run here. kron-torch is therefore timed only when opt_einsum is
available, or with --kron-torch-small on the 128-wide MLP (15 s per step
measured there, all of it that outer product: not a fair comparison).
"""

import sys
import time

import torch

import torchopt_ext.optim as tox

try:
    from kron_torch import Kron as KronTorch
except ImportError:  # optional comparison
    KronTorch = None


def make(shapes):
    torch.manual_seed(0)
    params = [torch.randn(s) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def best_ms(opt, calls):
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        opt.step()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def memory_per_param(shapes, dtype):
    params = make(shapes)
    opt = tox.Kron(params, precond_dtype=dtype, preconditioner_update_probability=1.0)
    opt.step()
    q_bytes = sum(s["Q"].numel() * s["Q"].element_size() for s in opt.state.values())
    return q_bytes / sum(p.numel() for p in params)


def main() -> None:
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    sets = {
        "MLP 128-128-128 (+biases)": [(128, 128), (128,), (128, 128), (128,)],
        "MLP 512-2048-512 (+biases)": [(2048, 512), (2048,), (512, 2048), (512,)],
        "square 512x512 x4": [(512, 512)] * 4,
        "conv 64x32x3x3 x4": [(64, 32, 3, 3)] * 4,
    }
    print("| params | kron-torch ms | Kron EQ ms | Kron Q0.5EQ1.5 ms | EQ / kron-torch | fp32 Q bytes/param | bf16 |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for name, shapes in sets.items():
        common = dict(lr=1e-3, preconditioner_update_probability=1.0)
        ours_eq = tox.Kron(make(shapes), preconditioner_mode="EQ", preconditioner_init_scale=1.0, **common)
        ours = tox.Kron(make(shapes), preconditioner_init_scale=1.0, **common)
        usable = KronTorch is not None and (
            torch.backends.opt_einsum.is_available() or ("--kron-torch-small" in sys.argv and "128" in name)
        )
        theirs = KronTorch(make(shapes), merge_dims=False, precond_init_scale=1.0, **common) if usable else None
        t_eq = t_ours = t_theirs = float("inf")
        for _ in range(5):
            t_eq = min(t_eq, best_ms(ours_eq, 3))
            t_ours = min(t_ours, best_ms(ours, 3))
            if theirs is not None:
                t_theirs = min(t_theirs, best_ms(theirs, 3))
        ratio = f"{t_eq / t_theirs:.2f}" if theirs is not None else "n/a"
        t_theirs_text = f"{t_theirs:.2f}" if theirs is not None else "n/a"
        mem32 = memory_per_param(shapes, torch.float32)
        mem16 = memory_per_param(shapes, torch.bfloat16)
        print(f"| {name} | {t_theirs_text} | {t_eq:.2f} | {t_ours:.2f} | {ratio} | {mem32:.3f} | {mem16:.3f} |")


if __name__ == "__main__" and "--stacked" not in sys.argv:
    main()


# -- stacked (scanned) layers: per-slice vs batched ------------------------------


def stacked_main() -> None:
    """``python benchmarks/bench_kron.py --stacked``: one stacked (L, m, n)
    param (``stacked=True``, slices updated as bmm batches; also in chunks)
    against the same L slices as L separate params (one op entry each: the
    per-slice path stacked groups took before batching), default geometry,
    update probability 1, one thread, fastest of 5 x 3 calls each."""
    torch.set_num_threads(1)
    torch._dynamo.config.disable = True
    common = dict(lr=1e-3, preconditioner_update_probability=1.0, preconditioner_init_scale=1.0)
    print("| stacked param | per-slice ms | batched ms | batched, chunk 4 ms | per-slice / batched |")
    print("|---|--:|--:|--:|--:|")
    for layers, rows, cols in ((64, 32, 32), (16, 128, 128), (8, 256, 512)):
        (stacked,) = make([(layers, rows, cols)])
        separate = [stacked[i].clone() for i in range(layers)]
        for i, q in enumerate(separate):
            q.grad = stacked.grad[i].clone()
        runs = {
            "per-slice": tox.Kron(separate, **common),
            "batched": tox.Kron([stacked.clone()], stacked=True, **common),
            "chunk 4": tox.Kron([stacked.clone()], stacked=True, stacked_chunk_size=4, **common),
        }
        for name in ("batched", "chunk 4"):
            runs[name].param_groups[0]["params"][0].grad = stacked.grad.clone()
        best = {name: float("inf") for name in runs}
        for _ in range(5):
            for name, opt in runs.items():
                best[name] = min(best[name], best_ms(opt, 3))
        print(
            f"| ({layers}, {rows}, {cols}) | {best['per-slice']:.2f} | {best['batched']:.2f} | "
            f"{best['chunk 4']:.2f} | {best['per-slice'] / best['batched']:.2f} |"
        )


if __name__ == "__main__" and "--stacked" in sys.argv:
    stacked_main()
