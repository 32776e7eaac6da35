"""The GPU benchmark script runs only when a device is lent: its CPU smoke mode keeps it working."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


def test_gpu_benchmark_script_runs_every_step_in_smoke_mode():
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    steps = {line.split(" ", 1)[0]: line for line in run.stdout.splitlines()}
    for step in ("peak", "fold", "agc", "onnx"):
        assert step in steps, run.stdout
        assert "'error'" not in steps[step] and "_error'" not in steps[step], steps[step]
    assert "ours_vs_timm" in steps["onnx"] and "int8_speedup" in steps["onnx"]
