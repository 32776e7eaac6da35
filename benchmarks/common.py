"""Shared helpers of the benchmark scripts: timing by medians, realistic models and gradients."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def median_s(fn, *, runs: int = 15, warmup: int = 3, sync=lambda: None) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


@torch.no_grad()
def trained_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero skip gains and gains away from 1: at initialisation skip gains are 0, which hides
    every residual branch (and would flatter a folded model, which drops such branches)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("skipinit_gain"):
            p.copy_(0.2 + 0.05 * torch.randn(p.shape, generator=g))
        elif name.endswith("gain"):
            p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def machine() -> dict:
    info = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    try:
        info["cpu_model"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                 if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags"))
        info["cpu_flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save(name: str, results: dict, directory: Path = RESULTS) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    print(f"wrote {path}")
    return path
