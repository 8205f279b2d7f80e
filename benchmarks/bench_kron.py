"""Kron step time vs the public PyTorch PSGD Kron implementations at equal
settings, and the preconditioner memory per parameter.

    python benchmarks/bench_kron.py                  # 1 and 2 threads
    python benchmarks/bench_kron.py --threads 1 --rounds 5
    python benchmarks/bench_kron.py --quick          # small models, smoke run
    python benchmarks/bench_kron.py --device cuda    # on a GPU (adds two larger models)

Baselines (benchmarks/README.md has the pip line): kron-torch 0.3.3's `Kron`
and heavyball 3.2.1's `PSGDKron` (both the triangular EQ update, against our
`Kron(preconditioner_mode="EQ")`) and heavyball's `PSGDPRO` (the Procrustes
Q0.5EQ1.5 update, against our default mode). WhiteKron (skew / quad, 256
tiles) is timed on the same models next to them; heavyball has no tiled
White-Kron, PSGDPRO (same Procrustes step, whole-axis factors) is its nearest
relative.

Equal settings: update probability 1 (every step updates the factors), init
scale 1, fp32 factors and momentum, no dim merging, max_size_triangular 2048
(heavyball's default) for everyone, no skew rule for ours
(max_skew_triangular=inf, the baselines have none), the preconditioner fitted
on the momentum (ours whiten_grad=False, the baselines' default), every
optimizer eager: dynamo is disabled, which turns kron-torch's @torch.compile
functions into plain calls, and heavyball.utils.compile_mode = None turns off
heavyball's internal compile. Each optimizer keeps its own post-clip (ours
per-tensor RMS, kron-torch's RMS clip, heavyball's trust-region clip for
PSGDKron, none for PSGDPRO): a few elementwise passes, small next to the
matmuls.

Timing: the optimizers alternate call by call (grads re-assigned before every
call: heavyball clears them), each keeps the fastest and the median of its
calls, so a machine that gets busy hurts all alike. The 1-minute load average
is printed; the script refuses to time above 1.5 unless --force.
`--clock thread` times with `time.thread_time()` (CPU time of the calling
thread, 1 thread only): a busy machine then inflates the figures much less
(time spent descheduled is not counted), but cache sharing still costs.

`--device cuda`: params, grads and every optimizer's state on the GPU, each
timed call bracketed by `torch.cuda.synchronize()` (wall clock; threads and
the load check do not apply), TF32 off for everyone (fp32 GEMMs in full
fp32). Our PSGD ops draw on the host and copy the draws (docs/design.md), the
baselines draw on the device: that cost is part of what is compared. Two
larger models are added, where GEMMs rather than launches dominate. On a
device machine without the baselines, carry their wheels (`.ci/gpu_session.sh
psgd` installs `.whl/*.whl` when present).
"""

import argparse
import contextlib
import importlib.metadata as md
import io
import math
import os
import statistics
import sys
import time

import torch

import torchopt_ext.optim as tox

try:
    from kron_torch import Kron as KronTorch
except ImportError:  # optional comparison
    KronTorch = None
try:
    import heavyball
except ImportError:  # optional comparison
    heavyball = None

MAX_SIZE = 2048


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


# ---- the comparison --------------------------------------------------------


def _tensor_bytes(value):
    if torch.is_tensor(value):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    return 0


def _q_bytes(state):
    """Bytes of the preconditioner factors in one param's state, for every
    layout: ours `Q` (Kron) / `ql`, `qr` (WhiteKron), kron-torch `Q` (list),
    heavyball `<fn>_Q_<i>` (nested per-index dicts; PSGDKron stores triangles
    as lines). Lipschitz / lower-bound scalars are not counted."""
    total = 0
    for key, value in state.items():
        if isinstance(value, dict):
            total += _q_bytes(value)
        elif isinstance(key, str) and (key in ("Q", "ql", "qr") or "_Q_" in key) and "cache" not in key:
            total += _tensor_bytes(value)
    return total


class Case:
    """One optimizer on its own copy of a model, stepped with fixed grads."""

    device = torch.device("cpu")  # --device

    def __init__(self, name, factory, shapes):
        torch.manual_seed(0)
        self.name = name
        self.params = [torch.randn(s).to(Case.device) for s in shapes]
        self.grads = [torch.randn(s).to(Case.device) for s in shapes]
        self.opt = factory(self.params)
        self.times = []

    def step(self):
        for p, g in zip(self.params, self.grads):
            p.grad = g
        with contextlib.redirect_stdout(io.StringIO()):  # kron-torch prints its sizes once
            self.opt.step()

    clock = time.perf_counter  # or time.thread_time (--clock thread)

    def timed_step(self):
        cuda = Case.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        start = Case.clock()
        self.step()
        if cuda:
            torch.cuda.synchronize()
        self.times.append((Case.clock() - start) * 1e3)

    def q_bytes_per_param(self):
        total = sum(_q_bytes(s) for s in self.opt.state.values())
        return total / sum(p.numel() for p in self.params)


def factories(precond_dtype):
    """name -> optimizer factory at the equal settings of the module docstring."""
    ours = dict(
        lr=1e-3,
        preconditioner_update_probability=1.0,
        preconditioner_init_scale=1.0,
        max_size_triangular=MAX_SIZE,
        max_skew_triangular=math.inf,
        whiten_grad=False,
        precond_dtype=precond_dtype,
    )
    out = {
        "Kron EQ": lambda ps: tox.Kron(ps, preconditioner_mode="EQ", **ours),
        "Kron Q0.5EQ1.5": lambda ps: tox.Kron(ps, **ours),
    }
    if KronTorch is not None:
        out["kron-torch"] = lambda ps: KronTorch(
            ps,
            lr=1e-3,
            preconditioner_update_probability=1.0,
            max_size_triangular=MAX_SIZE,
            merge_dims=False,
            precond_init_scale=1.0,
            precond_dtype=precond_dtype,
        )
    if heavyball is not None:
        q_dtype = str(precond_dtype).removeprefix("torch.")
        hb = dict(
            lr=1e-3,
            preconditioner_update_probability=1.0,
            max_size_triangular=MAX_SIZE,
            merge_dims=False,
            precond_init_scale=1.0,
            q_dtype=q_dtype,
            storage_dtype="float32",
        )
        out["hb PSGDKron"] = lambda ps: heavyball.PSGDKron(ps, **hb)
        out["hb PSGDPRO"] = lambda ps: heavyball.PSGDPRO(ps, **hb)
    return out


def white(precond_dtype):
    return {
        "WhiteKron skew": lambda ps: tox.WhiteKron(ps, dtype=precond_dtype, seed=0),
        "WhiteKron quad": lambda ps: tox.Quad(ps, dtype=precond_dtype, seed=0),
    }


WHITE = white(torch.float32)


def compare(models, threads, rounds, with_white):
    if threads is not None:
        torch.set_num_threads(threads)
    names = list(factories(torch.float32)) + (list(WHITE) if with_white else [])
    rows = []
    for model, shapes in models.items():
        makers = {**factories(torch.float32), **(WHITE if with_white else {})}
        cases = [Case(name, make_opt, shapes) for name, make_opt in makers.items()]
        for case in cases:  # first steps: lazy state, heavyball's init-only step
            case.step()
            case.step()
        for _ in range(rounds):
            for case in cases:
                case.timed_step()
        rows.append((model, {c.name: (min(c.times), statistics.median(c.times)) for c in cases}))
    where = f"threads {threads}" if threads is not None else str(Case.device)
    print(f"\n{where}, {rounds} alternating calls each, ms per step: best (median)\n")
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    for model, times in rows:
        cells = [f"{times[n][0]:.1f} ({times[n][1]:.1f})" if n in times else "n/a" for n in names]
        print(f"| {model} | " + " | ".join(cells) + " |")
    pairs = [("Kron EQ", "kron-torch"), ("Kron EQ", "hb PSGDKron"), ("Kron Q0.5EQ1.5", "hb PSGDPRO")]
    if with_white:
        pairs += [("WhiteKron skew", "hb PSGDPRO"), ("WhiteKron skew", "Kron Q0.5EQ1.5")]
    pairs = [p for p in pairs if p[0] in names and p[1] in names]
    print("\nratios of best times (target <= 0.70 for Kron vs the baselines)\n")
    print("| model | " + " | ".join(f"{a} / {b}" for a, b in pairs) + " |")
    print("|---|" + "--:|" * len(pairs))
    for model, times in rows:
        print(f"| {model} | " + " | ".join(f"{times[a][0] / times[b][0]:.2f}" for a, b in pairs) + " |")


def memory(models, with_white):
    print("\npreconditioner bytes per param (fp32 factors / bf16 factors)\n")
    names = list(factories(torch.float32)) + (list(WHITE) if with_white else [])
    print("| model | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    for model, shapes in models.items():
        cells = []
        for name in names:
            per_dtype = []
            for dtype in (torch.float32, torch.bfloat16):
                make_opt = {**factories(dtype), **white(dtype)}[name]
                case = Case(name, make_opt, shapes)
                case.step()
                case.step()
                per_dtype.append(case.q_bytes_per_param())
            cells.append(f"{per_dtype[0]:.3f} / {per_dtype[1]:.3f}")
        print(f"| {model} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per optimizer")
    parser.add_argument("--quick", action="store_true", help="small models (smoke run)")
    parser.add_argument("--no-white", action="store_true", help="leave out WhiteKron")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--models", default="", help="only models whose name contains one of these (comma-separated)")
    parser.add_argument("--force", action="store_true", help="time even when the load average is >= 1.5")
    parser.add_argument(
        "--clock", choices=("wall", "thread"), default="wall", help="thread: CPU time of the main thread (1 thread)"
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    torch._dynamo.config.disable = True
    if heavyball is not None:
        heavyball.utils.compile_mode = None
    if args.quick:
        sets = {
            "MLP 128-256-128 (+biases)": [(256, 128), (256,), (128, 256), (128,)],
            "conv 32x16x3x3 (+bias)": [(32, 16, 3, 3), (32,)],
        }
    else:
        sets = {
            "MLP 512-1024-1024-512 (+biases)": [(1024, 512), (1024,), (1024, 1024), (1024,), (512, 1024), (512,)],
            "4096x1024": [(4096, 1024)],
            "1024x4096": [(1024, 4096)],
            "conv 128x64x3x3 (+bias)": [(128, 64, 3, 3), (128,)],
            "mix 256x256 x4 + 8 biases": [(256, 256)] * 4 + [(256,)] * 8,
        }
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda: torch sees no CUDA device")
        Case.device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        if not args.quick:
            sets["2048x2048"] = [(2048, 2048)]
            sets["block 1024: qkv, out, mlp up / down"] = [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)]
    if args.models:
        keys = args.models.split(",")
        sets = {name: shapes for name, shapes in sets.items() if any(k in name for k in keys)}
    if args.clock == "thread":
        if args.threads != "1":
            parser.error("--clock thread needs --threads 1 (worker threads' time is not counted)")
        Case.clock = time.thread_time
    load = os.getloadavg()[0]
    versions = f"torch {torch.__version__}"
    if KronTorch is not None:
        versions += f", kron-torch {md.version('kron-torch')}"
    if heavyball is not None:
        versions += f", heavyball {md.version('heavyball')}"
    print(f"{versions}, opt_einsum {torch.backends.opt_einsum.is_available()}, load {load:.2f}, clock {args.clock}")
    if args.device == "cuda":
        print(f"device {torch.cuda.get_device_name()}")
        compare(sets, None, args.rounds, not args.no_white)
    elif load < 1.5 or args.force:
        for threads in (int(t) for t in args.threads.split(",")):
            compare(sets, threads, args.rounds, not args.no_white)
    else:
        print("load >= 1.5: step times not measured; rerun on an idle machine or with --force")
    if not args.no_memory:
        memory(sets, not args.no_white)


if __name__ == "__main__" and "--stacked" not in sys.argv:
    main()


# -- stacked (scanned) layers: per-slice vs batched ------------------------------


def stacked_main() -> None:
    """``python benchmarks/bench_kron.py --stacked [--threads 1,2] [--force]``:
    batched vs one-problem-at-a-time updates of L problems of one shape
    (issue 5's open item, the default of ``batch_equal_shapes``). Per size:
    one stacked (L, m, n) param with ``batch_equal_shapes=True`` (bmm over
    the L slices) and ``False`` (a loop of mm chains over the slices), the
    default (None), and the same L slices as L separate params, batched
    (issue 7) and not. Default geometry, update probability 1, init scale 1;
    the runs alternate call by call, fastest of 5 rounds x 3 calls each. The
    1-minute load average is printed; refuses to time above 1.5 unless --force."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--stacked", action="store_true")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--force", action="store_true", help="time even when the load average is >= 1.5")
    args = parser.parse_args()
    torch._dynamo.config.disable = True
    common = dict(lr=1e-3, preconditioner_update_probability=1.0, preconditioner_init_scale=1.0)
    sizes = [
        (64, 16, 16),
        (64, 32, 32),
        (32, 48, 48),
        (32, 64, 64),
        (16, 64, 128),
        (16, 96, 96),
        (16, 128, 128),
        (8, 256, 512),
    ]
    for threads in (int(t) for t in args.threads.split(",")):
        load = os.getloadavg()[0]
        print(f"\ntorch {torch.__version__}, threads {threads}, load {load:.2f}\n")
        if load >= 1.5 and not args.force:
            print("load >= 1.5: not timed; rerun on an idle machine or with --force")
            continue
        torch.set_num_threads(threads)
        print(
            "| (L, m, n) | slice numel | stacked loop ms | stacked batched ms | loop / batched | default ms "
            "| L params, per-param ms | L params, batched ms | per-param / batched |"
        )
        print("|---|--:|--:|--:|--:|--:|--:|--:|--:|")
        for layers, rows, cols in sizes:
            (stacked,) = make([(layers, rows, cols)])
            separate = [stacked[i].clone() for i in range(layers)]
            runs = {
                "loop": tox.Kron([stacked.clone()], stacked=True, batch_equal_shapes=False, **common),
                "batched": tox.Kron([stacked.clone()], stacked=True, batch_equal_shapes=True, **common),
                "default": tox.Kron([stacked.clone()], stacked=True, **common),
                "params loop": tox.Kron([q.clone() for q in separate], batch_equal_shapes=False, **common),
                "params batched": tox.Kron([q.clone() for q in separate], batch_equal_shapes=True, **common),
            }
            for opt in runs.values():
                ps = opt.param_groups[0]["params"]
                if len(ps) == 1:
                    ps[0].grad = stacked.grad.clone()
                else:
                    for i, q in enumerate(ps):
                        q.grad = stacked.grad[i].clone()
                opt.step()  # first step: factor creation, not timed
            best = {name: float("inf") for name in runs}
            for _ in range(5):
                for name, opt in runs.items():
                    best[name] = min(best[name], best_ms(opt, 3))
            print(
                f"| ({layers}, {rows}, {cols}) | {rows * cols} | {best['loop']:.2f} | {best['batched']:.2f} | "
                f"{best['loop'] / best['batched']:.2f} | {best['default']:.2f} | {best['params loop']:.2f} | "
                f"{best['params batched']:.2f} | {best['params loop'] / best['params batched']:.2f} |"
            )


if __name__ == "__main__" and "--stacked" in sys.argv:
    stacked_main()
