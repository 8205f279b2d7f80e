"""Side-by-side AdamW step timer: torchopt_ext.optim.AdamW against torch.optim.AdamW.

Not a test: it times ``optimizer.step()`` for torchopt_ext and for torch.optim.AdamW with
``foreach=True``, ``fused=True`` and (on the smaller workloads) ``foreach=False``, on

* ``one-64M``: a single 64M-parameter tensor,
* ``mixed-200``: 200 tensors of mixed (odd included) sizes, ~20M parameters in all,

each with fp32 and bf16 params, and compares the achieved memory traffic with the bandwidth of a
plain ``dst.copy_(src)`` measured in the same run.

Method
------
* Every (workload, dtype, optimizer) config runs in a fresh subprocess, so one config's allocator
  state or page cache cannot help or hurt the next; configs are interleaved round-robin over
  ``--repeats`` rounds so a burst of background load hits all of them alike.
* In the subprocess: params and grads are random tensors made once (the step does not need new
  grads), ``--warmup`` steps run first (the first one allocates the state, so state init is never
  timed), then ``--steps`` steps are timed one by one with ``time.perf_counter``; the run's figure
  is the median step. The reported figure is the median of the run medians over the rounds (on a
  shared VM noise goes both ways, so neither best nor worst run is trusted); the table shows the
  min-max of the run medians and the JSON keeps every step time.
* Achieved GB/s counts the bytes AdamW must move: param read+write, grad read, exp_avg and
  exp_avg_sq read+write, i.e. 28 bytes/param for fp32 and 14 for bf16 with bf16 state.
* Copy bandwidth: ``dst.copy_(src)`` on a large fp32 buffer, (read + write bytes) / median time.
  It is not a hard ceiling: the write-allocate read of ``dst`` goes uncounted (STREAM convention)
  and one read stream per core is latency-bound, so AdamW (4 read streams, all writes to lines it
  has just read) can beat it. An in-place ``x.mul_(1.0)`` (read + write bytes) is reported beside
  it as the closer match to an in-place optimizer's access pattern.
* Peak RSS growth: after warm-up (state already allocated) the kernel's RSS high-water mark is
  reset (``echo 5 > /proc/self/clear_refs``); after the timed steps, VmHWM minus the RSS before
  them is the extra memory the steps needed (temporaries), in MiB. tracemalloc cannot see torch's
  CPU allocations, hence the kernel counter.

Run ``python benchmarks/bench_adamw.py --quick`` for a smoke run; see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

import torchopt_ext

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 2**20
GB = 1e9

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Table label -> build_optimizer kind; the table lists rows in this order.
OPTIMIZERS = {
    "torchopt_ext": "torchopt_ext",
    "torchopt_ext (fp32 state)": "torchopt_ext_fp32_state",
    "torch foreach": "torch_foreach",
    "torch fused": "torch_fused",
    "torch single-tensor": "torch_single",
}
REFERENCE = "torch fused"
HYPERPARAMS = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}


# ----------------------------------------------------------------------------- workloads


def mixed_sizes(count: int, total: int, seed: int = 1234) -> list[int]:
    """Deterministic log-uniform tensor sizes (1 .. ~1.5M) scaled to about ``total`` elements.

    Log-uniform mixes many small tensors (biases, norms) with a few large ones, like a real
    model; every other size is forced odd so vectorized kernels must handle ragged tails.
    """
    rng = random.Random(seed)
    raw = [math.exp(rng.uniform(0.0, math.log(1.5e6))) for _ in range(count)]
    scale = total / sum(raw)
    sizes = [max(1, int(r * scale)) for r in raw]
    return [s | 1 if i % 2 == 0 else s for i, s in enumerate(sizes)]


def workload_sizes(name: str, quick: bool) -> list[int]:
    if name == "one-64M":
        return [(1 if quick else 64) * MIB]
    if name == "mixed-200":
        return mixed_sizes(20, 1_000_000) if quick else mixed_sizes(200, 20_000_000)
    raise ValueError(f"unknown workload {name}")


def bytes_per_param(param_dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    """AdamW's minimum traffic: param r/w, grad r, exp_avg r/w, exp_avg_sq r/w."""
    p = torch.finfo(param_dtype).bits // 8
    s = torch.finfo(state_dtype).bits // 8
    return 2 * p + p + 4 * s


def config_list(args: argparse.Namespace) -> list[dict[str, Any]]:
    configs = []
    for workload in ("one-64M", "mixed-200"):
        for dtype in ("fp32", "bf16"):
            for label in OPTIMIZERS:
                if label == "torchopt_ext (fp32 state)" and dtype != "bf16":
                    continue  # identical to the plain row for fp32 params
                if label == "torch single-tensor" and (workload != "mixed-200" or args.no_single):
                    continue  # a baseline only; too slow to be worth it on the big tensor
                configs.append({"workload": workload, "dtype": dtype, "optimizer": label})
    return configs


# ----------------------------------------------------------------------------- worker side


def read_rss_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def reset_rss_high_water() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_optimizer(label: str, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    kind = OPTIMIZERS[label]
    if kind == "torchopt_ext":
        return torchopt_ext.optim.AdamW(params, **HYPERPARAMS)
    if kind == "torchopt_ext_fp32_state":
        return torchopt_ext.optim.AdamW(params, **HYPERPARAMS, state_dtype=torch.float32)
    if kind == "torch_foreach":
        return torch.optim.AdamW(params, **HYPERPARAMS, foreach=True)
    if kind == "torch_fused":
        return torch.optim.AdamW(params, **HYPERPARAMS, fused=True)
    if kind == "torch_single":
        return torch.optim.AdamW(params, **HYPERPARAMS, foreach=False)
    raise ValueError(label)


def count_state_tensors(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[int]:
    """Distinct per-param state tensor counts, not counting the 0-d ``step``."""
    counts = set()
    for p in params:
        counts.add(sum(1 for v in opt.state[p].values() if torch.is_tensor(v) and v.dim() > 0))
    return sorted(counts)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        v.numel() * v.element_size()
        for st in opt.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.dim() > 0
    )


def step_worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dtype = DTYPES[spec["dtype"]]
    params = []
    for n in spec["sizes"]:
        p = torch.randn(n, dtype=dtype, requires_grad=True)
        p.grad = torch.randn(n, dtype=dtype)
        params.append(p)
    opt = build_optimizer(spec["optimizer"], params)

    for _ in range(spec["warmup"]):
        opt.step()  # the first step allocates exp_avg / exp_avg_sq: never timed

    rss_before = read_rss_kib()["VmRSS"]
    hwm_reset = reset_rss_high_water()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    peak = read_rss_kib()["VmHWM"]

    state_dtypes = sorted({str(v.dtype) for st in opt.state.values() for v in st.values() if v.dim() > 0})
    return {
        "times_s": times,
        "median_s": statistics.median(times),
        "state_tensors_per_param": count_state_tensors(opt, params),
        "state_dtypes": state_dtypes,
        "state_bytes": state_bytes(opt),
        "rss_before_mib": rss_before / 1024,
        "peak_growth_mib": (peak - rss_before) / 1024 if hwm_reset else None,
    }


def median_time(fn: Any, count: int) -> tuple[float, list[float]]:
    for _ in range(2):
        fn()  # fault in pages before timing
    times = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def copy_worker(spec: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(spec["threads"])
    src = torch.randn(spec["copy_bytes"] // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()  # read + write, both cases
    count = max(20, spec["steps"])  # cheap, and a short sample is easily spoiled by noise
    copy_s, copy_times = median_time(lambda: dst.copy_(src), count)
    inplace_s, inplace_times = median_time(lambda: dst.mul_(1.0), count)
    return {
        "times_s": copy_times,
        "median_s": copy_s,
        "gbps": nbytes / copy_s / GB,
        "inplace_times_s": inplace_times,
        "inplace_gbps": nbytes / inplace_s / GB,
    }


def run_worker(spec_json: str) -> None:
    spec = json.loads(spec_json)
    result = copy_worker(spec) if spec["kind"] == "copy" else step_worker(spec)
    # One tagged line, so stray warnings on stdout cannot break the parent's parsing.
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- parent side


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError(f"worker failed for {spec.get('optimizer', 'copy')}:\n{proc.stdout}\n{proc.stderr}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16")
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in wanted if w in have]
    except OSError:
        pass
    return []


def git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(threads: int) -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "torchopt_ext": torchopt_ext.__version__,
        "git": git_revision(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "loadavg_start": list(os.getloadavg()),
    }


def summarize(configs: list[dict[str, Any]], runs: dict[int, list[dict]], copy_runs: list[dict]) -> dict:
    """Per config: median run median, GB/s, ratios against copy bandwidth and torch fused."""
    copy_gbps = statistics.median(r["gbps"] for r in copy_runs)
    inplace_gbps = statistics.median(r["inplace_gbps"] for r in copy_runs)
    rows = []
    for i, cfg in enumerate(configs):
        results = runs[i]
        medians = [r["median_s"] for r in results]
        step_s = statistics.median(medians)
        first = results[0]
        dtype = DTYPES[cfg["dtype"]]
        state_dtype = torch.float32 if cfg["optimizer"] == "torchopt_ext (fp32 state)" else dtype
        numel = sum(cfg["sizes"])
        bpp = bytes_per_param(dtype, state_dtype)
        gbps = bpp * numel / step_s / GB
        growth = [r["peak_growth_mib"] for r in results if r["peak_growth_mib"] is not None]
        rows.append(
            {
                **{k: cfg[k] for k in ("workload", "dtype", "optimizer")},
                "tensors": len(cfg["sizes"]),
                "numel": numel,
                "state_dtype": str(state_dtype).replace("torch.", ""),
                "bytes_per_param": bpp,
                "ms_per_step": step_s * 1e3,
                "run_medians_ms": [r["median_s"] * 1e3 for r in results],
                "gbps": gbps,
                "frac_of_copy_bw": gbps / copy_gbps,
                "state_tensors_per_param": first["state_tensors_per_param"],
                "state_dtypes_seen": first["state_dtypes"],
                "state_mib": first["state_bytes"] / MIB,
                "peak_growth_mib": max(growth) if growth else None,
            }
        )
    for row in rows:
        ref = next(
            r
            for r in rows
            if r["optimizer"] == REFERENCE and r["workload"] == row["workload"] and r["dtype"] == row["dtype"]
        )
        row["time_vs_torch_fused"] = row["ms_per_step"] / ref["ms_per_step"]
    return {
        "copy_gbps": copy_gbps,
        "copy_run_gbps": [r["gbps"] for r in copy_runs],
        "inplace_gbps": inplace_gbps,
        "inplace_run_gbps": [r["inplace_gbps"] for r in copy_runs],
        "rows": rows,
    }


def render_markdown(summary: dict, info: dict, args: argparse.Namespace, command: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Date: {info['date']}  ",
        f"Machine: {info['cpu_model']} ({', '.join(info['cpu_flags'])}), "
        f"{info['logical_cpus']} logical CPUs, "
        f"torch {info['torch']} with {info['torch_threads']} threads, torchopt_ext {info['torchopt_ext']} "
        f"(git {info['git']}); load average {info['loadavg_start'][0]:.2f} at start, "
        f"{info['loadavg_end'][0]:.2f} at end.  ",
        f"Method: warm-up steps: {args.warmup} (state init excluded), median of {args.steps} timed steps per "
        f"fresh subprocess, median over {args.repeats} interleaved rounds (spread: min-max of the run medians).  ",
        f"Copy bandwidth (`dst.copy_(src)`, {args.copy_mb} MiB fp32, read+write bytes / time): "
        f"**{summary['copy_gbps']:.1f} GB/s** (rounds: "
        + ", ".join(f"{g:.1f}" for g in summary["copy_run_gbps"])
        + f"); in-place `x.mul_(1.0)` on the same buffer: {summary['inplace_gbps']:.1f} GB/s (rounds: "
        + ", ".join(f"{g:.1f}" for g in summary["inplace_run_gbps"])
        + "). copy_ is no hard ceiling (uncounted write-allocate reads, one latency-bound read stream "
        "per core), so AdamW can exceed 100% of it.  ",
        "GB/s = AdamW bytes/param (param r/w + grad r + exp_avg r/w + exp_avg_sq r/w) x params / step time. "
        "Peak RSS growth = RSS high-water during the timed steps minus RSS after warm-up "
        "(state already allocated), max over rounds.",
        "",
        "| workload | dtype | optimizer | state | B/param | ms/step | spread (ms) | GB/s | % of copy BW | "
        "time / torch fused | state tensors/param | peak RSS growth (MiB) |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in summary["rows"]:
        plural = "s" if r["tensors"] > 1 else ""
        workload = f"{r['workload']} ({r['tensors']} tensor{plural}, {r['numel'] / 1e6:.1f}M)"
        counts = "/".join(str(c) for c in r["state_tensors_per_param"])
        growth = "n/a" if r["peak_growth_mib"] is None else f"{r['peak_growth_mib']:.0f}"
        lines.append(
            f"| {workload} | {r['dtype']} | {r['optimizer']} | {r['state_dtype']} | {r['bytes_per_param']} | "
            f"{r['ms_per_step']:.2f} | {min(r['run_medians_ms']):.2f}-{max(r['run_medians_ms']):.2f} | "
            f"{r['gbps']:.1f} | {100 * r['frac_of_copy_bw']:.0f}% | "
            f"{r['time_vs_torch_fused']:.2f} | {counts} | {growth} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run (median taken)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first inits state)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds, fresh subprocess each")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    parser.add_argument("--copy-mb", type=int, default=256, help="copy-bandwidth buffer size in MiB")
    parser.add_argument("--no-single", action="store_true", help="skip the torch single-tensor baseline")
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round: a smoke run")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.repeats, args.copy_mb = min(args.steps, 3), 1, 1, 16
    args.copy_bytes = args.copy_mb * MIB
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return

    command = "python benchmarks/bench_adamw.py" + "".join(" " + shlex.quote(a) for a in sys.argv[1:])
    info = machine_info(args.threads)
    info["date"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    configs = config_list(args)
    for cfg in configs:
        cfg["sizes"] = workload_sizes(cfg["workload"], args.quick)
    common = {"threads": args.threads, "steps": args.steps, "warmup": args.warmup}

    runs: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    copy_runs = []
    for rnd in range(args.repeats):
        copy_runs.append(spawn({**common, "kind": "copy", "copy_bytes": args.copy_bytes}))
        print(f"round {rnd + 1}/{args.repeats}: copy {copy_runs[-1]['gbps']:.1f} GB/s", file=sys.stderr)
        for i, cfg in enumerate(configs):
            result = spawn({**common, "kind": "step", **cfg})
            runs[i].append(result)
            print(
                f"  {cfg['workload']:>9} {cfg['dtype']} {cfg['optimizer']:<26}",
                f"{result['median_s'] * 1e3:9.2f} ms",
                file=sys.stderr,
            )
    info["loadavg_end"] = list(os.getloadavg())

    summary = summarize(configs, runs, copy_runs)
    markdown = render_markdown(summary, info, args, command)
    stem = "adamw-quick" if args.quick else "adamw"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    raw = [{**{k: v for k, v in cfg.items() if k != "sizes"}, "runs": runs[i]} for i, cfg in enumerate(configs)]
    payload = {
        "command": command,
        "machine": info,
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "out_dir")},
        "mixed_sizes": workload_sizes("mixed-200", args.quick),
        "summary": summary,
        "raw": raw,
    }
    (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (args.out_dir / f"{stem}.md").write_text(markdown)
    print(markdown)


if __name__ == "__main__":
    main()
