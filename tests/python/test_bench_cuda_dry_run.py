"""benchmarks/bench_cuda.py walked end to end on the CPU with torch.cuda
faked (benchmarks/cuda_dry_run.py): every row a GPU session's bench phase
would produce is produced, so a Python error in the script fails CI instead
of costing device time. Times are CPU times and are not checked."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_cuda_runs_every_row_on_a_faked_device(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "cuda_dry_run.py"),
            *("--params", "2e5", "--tensors", "12", "--warmup", "1", "--iters", "1", "--repeats", "1"),
            *("--json", str(out), "--markdown", str(tmp_path / "bench.md")),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    labels = [row["label"] for row in result["rows"]]
    assert result["skipped"] == []
    # Ours, the eager and the compiled baselines (the optional packages' rows
    # only where installed, as in CI).
    for label in ("torchopt_ext AdamW", "torchopt_ext Adafactor", "torch AdamW fused", "torch.compile AdamW foreach"):
        assert label in labels, labels
    assert any(label.startswith("torch.compile spec foreach") for label in labels), labels
    assert [row["what"] for row in result["newton_schulz"]] == [
        "bf16 GEMM 8192^3",
        "newton_schulz 4096x4096 bf16, 5 steps",
        "newton_schulz 8192x2048 bf16, 5 steps",
    ]
    assert (tmp_path / "bench.md").read_text().strip()
