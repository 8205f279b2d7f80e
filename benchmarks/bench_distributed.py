"""Distributed optimizer step: whole-matrix ownership vs gathering everything.

Not a test. gloo CPU processes (one thread each) at world size 1, 2 and 4;
per configuration and world size:

- step time: ``opt.step()`` alone (grads computed once and kept), median over
  timed steps of the slowest rank (barriers around each step);
- state bytes per rank: the local parts of every state tensor;
- bytes sent per rank per step: counted from the tensors the optimizer sends
  to other ranks (all-gathers of the gather path, all-to-alls and Magma
  all-reduces of the ownership path; torchopt_ext.optim._ownership), the
  largest rank's figure.

Configurations: FSDP2 (``fully_shard`` per layer, Shard(0)) with AdamW (no
optimizer communication), Adafactor gathering every param (``"gather"``)
vs stepping on shards with all-reduced statistics (``"shards"``, default),
Muon, PRISM, Kron and SOAP with ``distributed_mode="gather"`` (every rank
all-gathers every param, grad and state tensor and runs every matrix's work)
and ``"owner"`` (default: Muon / PRISM send the matrix-function inputs to
owners; Kron / SOAP send param, grad and momenta to the owner, which alone
keeps the preconditioner state); and plain replicated params (as under DDP)
with Muon ``"owner"`` (every rank repeats every Newton-Schulz: no
communication) vs ``"replicated"`` (ownership + results sent back). LAMB and
MARS under FSDP2: ``distributed_mode="gather"`` (all-gather every param, grad
and state for the op) vs the default (local shards, one all-reduce of the
per-tensor squared norms). Kron / SOAP run with their defaults (Kron's
preconditioner update probability is 1 for the first 500 steps; SOAP
refreshes its eigenbases every 10 steps, so the 5 timed steps include one
refresh at most).

    python benchmarks/bench_distributed.py           # Muon/PRISM/AdamW: ~3 min on 2 idle cores
    python benchmarks/bench_distributed.py --quick   # smoke run on small sizes
    python benchmarks/bench_distributed.py --only LAMB,MARS
    python benchmarks/bench_distributed.py --only Adafactor
    python benchmarks/bench_distributed.py --only Kron,SOAP
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchopt_ext.optim as topt
from torchopt_ext.optim._ownership import comm_bytes, reset_comm_bytes

# A transformer-block-like stack (out, in): attention and MLP matrices of
# width 384 plus a few uneven ones, and 1-D params (AdamW branch).
FULL = [(384, 384)] * 4 + [(1536, 384), (384, 1536)] * 2 + [(200, 384), (384, 77)]
QUICK = [(64, 64)] * 3 + [(256, 64), (64, 256), (30, 64)]

CONFIGS = [
    # (label, layout, optimizer class, options, distributed_mode)
    ("AdamW", "fsdp", "AdamW", dict(lr=1e-3), None),
    ("Muon gather", "fsdp", "Muon", dict(lr=1e-2), "gather"),
    ("Muon owner", "fsdp", "Muon", dict(lr=1e-2), "owner"),
    ("PRISM gather", "fsdp", "PRISM", dict(lr=1e-2), "gather"),
    ("PRISM owner", "fsdp", "PRISM", dict(lr=1e-2), "owner"),
    ("Adafactor gather", "fsdp", "Adafactor", dict(beta1=0.9), "gather"),
    ("Adafactor shards", "fsdp", "Adafactor", dict(beta1=0.9), "shards"),
    ("Kron gather", "fsdp", "Kron", dict(lr=1e-3, seed=0), "gather"),
    ("Kron owner", "fsdp", "Kron", dict(lr=1e-3, seed=0), "owner"),
    ("SOAP gather", "fsdp", "SOAP", dict(lr=3e-3), "gather"),
    ("SOAP owner", "fsdp", "SOAP", dict(lr=3e-3), "owner"),
    ("Muon DDP, every rank", "ddp", "Muon", dict(lr=1e-2), "owner"),
    ("Muon DDP, owner", "ddp", "Muon", dict(lr=1e-2), "replicated"),
    # Per-tensor norms: all-gather every DTensor vs shards + one norm all-reduce.
    ("LAMB gather", "fsdp", "LAMB", dict(lr=1e-3), "gather"),
    ("LAMB shards", "fsdp", "LAMB", dict(lr=1e-3), None),
    ("MARS gather", "fsdp", "MARS", dict(lr=1e-3), "gather"),
    ("MARS shards", "fsdp", "MARS", dict(lr=1e-3), None),
]


class Stack(torch.nn.Module):
    def __init__(self, shapes: list[tuple[int, int]]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for o, i in shapes)


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    total = 0
    for state in opt.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                t = value.to_local() if hasattr(value, "to_local") else value
                total += t.numel() * t.element_size()
    return total


def _worker(rank: int, world_size: int, store_path: str, shapes, steps: int, out_dir: str, only) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.FileStore(store_path, world_size)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world_size,))
    rows = []
    for label, layout, cls, options, mode in CONFIGS:
        if only and not any(word in label for word in only):
            continue
        torch.manual_seed(0)
        model = Stack(shapes)
        if layout == "fsdp":
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
        for p in model.parameters():
            # The same grads everywhere (a replicated model's are after DDP's all-reduce).
            g = torch.Generator().manual_seed(hash(tuple(p.shape)) % 2**31)
            full = torch.randn(tuple(p.shape), generator=g) * 1e-2
            if hasattr(p, "device_mesh"):
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None)
            p.grad = full
        opt = getattr(topt, cls)(model.parameters(), **options)
        if mode is not None:
            opt.distributed_mode = mode
        opt.step()  # state created; warm-up
        reset_comm_bytes()
        opt.step()
        sent = comm_bytes()
        times = []
        for _ in range(steps):
            dist.barrier()
            t0 = time.perf_counter()
            opt.step()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        stats = torch.tensor([statistics.median(times), float(sent), float(_state_bytes(opt))], dtype=torch.float64)
        gathered = [torch.zeros_like(stats) for _ in range(world_size)]
        dist.all_gather(gathered, stats)
        if rank == 0:
            g = torch.stack(gathered)
            rows.append(
                dict(
                    config=label,
                    world_size=world_size,
                    step_ms=1e3 * g[:, 0].max().item(),
                    sent_bytes_max=int(g[:, 1].max().item()),
                    state_bytes_max=int(g[:, 2].max().item()),
                    path=getattr(opt, "_last_matrix_path", "-"),
                )
            )
    if rank == 0:
        with open(os.path.join(out_dir, f"ws{world_size}.json"), "w") as fh:
            json.dump(rows, fh)
    dist.barrier()
    dist.destroy_process_group()


def _run(world_size: int, shapes, steps: int, out_dir: str, only) -> list[dict]:
    fd, store_path = tempfile.mkstemp(prefix="bench_dist_store_")
    os.close(fd)
    os.unlink(store_path)
    mp.start_processes(_worker, args=(world_size, store_path, shapes, steps, out_dir, only), nprocs=world_size,
                       start_method="spawn")  # fmt: skip
    with open(os.path.join(out_dir, f"ws{world_size}.json")) as fh:
        return json.load(fh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated words; run the configs whose label has one")
    args = parser.parse_args()
    shapes = QUICK if args.quick else FULL
    load = os.getloadavg()[0]
    n_params = sum(o * i + o for o, i in shapes)
    print(f"# {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load {load:.2f}, "
          f"{len(shapes)} layers, {n_params / 1e6:.2f}M params, torch {torch.__version__}")  # fmt: skip
    results = []
    with tempfile.TemporaryDirectory() as out_dir:
        for ws in (1, 2, 4):
            results += _run(ws, shapes, args.steps, out_dir, [p for p in args.only.split(",") if p])
    print("| config | ranks | path | step (ms, slowest rank) | sent / rank / step (MB) | state / rank (MB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['config']} | {r['world_size']} | {r['path']} | {r['step_ms']:.1f} | "
            f"{r['sent_bytes_max'] / 1e6:.2f} | {r['state_bytes_max'] / 1e6:.2f} |"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    name = "bench_distributed" + (f"_{args.only.replace(',', '_')}" if args.only else "")
    (out / f"{name}.json").write_text(json.dumps(dict(load=load, results=results), indent=1))
    print(f"load after: {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
