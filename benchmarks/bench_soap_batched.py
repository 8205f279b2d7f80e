"""SOAP's batched factor updates (issue 7): soap_step_ with params of equal
shape batched (bmm, batched eigh / QR: ``batch_equal_shapes=True``) vs one
param at a time (``False``; unset, the default picks per size and device), on models with many equal-shaped
layers. Mean step time over ``--steps`` steps (refreshes every
``precondition_frequency`` included, the first, init-only call excluded),
the two paths alternated over rounds and each one's best round kept; prints
the machine load and refuses to time above 1.5 unless ``--force``.

    python benchmarks/bench_soap_batched.py            # 12 x (512, 512) and 24 x (256, 256)
    python benchmarks/bench_soap_batched.py --quick    # smoke run
"""

import argparse
import os
import time

import torch

import torchopt_ext.optim as tox


class _SOAP(tox.SOAP):
    """SOAP whose op call sets batch_equal_shapes (an op-level switch only)."""

    def __init__(self, params, batch: bool, **kwargs):
        self._batch = batch
        super().__init__(params, **kwargs)

    def _op_kwargs(self, group):
        return dict(super()._op_kwargs(group), batch_equal_shapes=self._batch)


def _time(shapes, batch, steps, frequency, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(steps + 1)]
    opt = _SOAP(params, batch, lr=3e-3, precondition_frequency=frequency)
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()  # builds GG and Q only
    start = time.perf_counter()
    for gs in grads[1:]:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    return (time.perf_counter() - start) / steps, params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--frequency", type=int, default=10, help="precondition_frequency")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--force", action="store_true", help="time even when the load average is >= 1.5")
    args = parser.parse_args()
    models = {"12 x (512, 512)": [(512, 512)] * 12, "24 x (256, 256)": [(256, 256)] * 24}
    if args.quick:
        models = {"4 x (64, 64)": [(64, 64)] * 4}
        args.steps, args.rounds = 4, 1
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.2f}")
    if load >= 1.5 and not args.force:
        raise SystemExit("load average >= 1.5: not timing (use --force)")
    print("| model | per tensor (ms/step) | batched (ms/step) | speed-up | max abs param diff |")
    print("|---|---|---|---|---|")
    for name, shapes in models.items():
        best = {False: float("inf"), True: float("inf")}
        results = {}
        for _ in range(args.rounds):
            for batch in (False, True):
                seconds, params = _time(shapes, batch, args.steps, args.frequency)
                best[batch] = min(best[batch], seconds)
                results[batch] = params
        diff = max((a - b).abs().max().item() for a, b in zip(results[False], results[True]))
        print(
            f"| {name} | {best[False] * 1e3:.1f} | {best[True] * 1e3:.1f} | "
            f"{best[False] / best[True]:.2f}x | {diff:.1e} |"
        )
    print(f"load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
