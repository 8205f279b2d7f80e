"""The Python demo trains: its loss falls."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_python_example_loss_falls():
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "python" / "train_mlp.py"), "--steps", "150"],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if "loss" in line]
    assert len(losses) >= 3
    assert losses[-1] < 0.5 * losses[0]
