"""nfnet-hub train against timm's own train.py running the same model with our AGC (``nfnet-hub timm-train``),
end to end on a synthetic image folder with the same flags: nfnet_hub_f0, bf16, batch 64 at 192 px,
12 loader workers; the figure is epoch 2's average images per second (epoch 1 warms caches and compiles). The two
trainers take turns, ``--repeats`` times, the first to run alternating; medians and the ratio of medians are kept.

timm's train.py is not in the timm package: copy it from a timm checkout to ``benchmarks/timm_train.py``
(git-ignored; carry it to the device). Without it, only our trainer is measured.

    python benchmarks/trainer.py            # on a GPU: writes benchmarks/results/trainer.json
    python benchmarks/trainer.py --smoke    # on the CPU with nano and a tiny folder: checks the script
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, save  # noqa: E402

TIMM_TRAIN = Path(__file__).resolve().parent / "timm_train.py"
FULL = dict(model="nfnet_hub_f0", size=192, batch=64, workers=12, classes=10, per_class=320, device="cuda")
SMOKE = dict(model="nfnet_hub_nano", size=32, batch=8, workers=0, classes=2, per_class=24, device="cpu")


def make_folder(root: Path, classes: int, per_class: int, size: int) -> Path:
    """JPEGs of noise in class folders, train/ and validation/ (a small validation split)."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("validation", max(2, per_class // 8))):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (size + 32, size + 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)
    return root


def _flags(setup: dict, folder: Path, out: Path, experiment: str) -> list[str]:
    return ["--model", setup["model"], "--data-dir", str(folder), "--num-classes", str(setup["classes"]),
            "--img-size", str(setup["size"]), "--batch-size", str(setup["batch"]), "--workers",
            str(setup["workers"]), "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.1", "--clip-mode", "agc",
            "--clip-grad", "0.01", "--log-interval", "5", "--device", setup["device"], "--output", str(out),
            "--experiment", experiment, *(["--amp", "--amp-dtype", "bfloat16"] if setup["device"] == "cuda" else [])]


def _run(command: list[str], timeout: int) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    if run.returncode:
        raise RuntimeError(f"exit {run.returncode}: {(run.stdout + run.stderr)[-1500:]}")
    return run.stdout + run.stderr


def ours(setup: dict, folder: Path, out: Path, timeout: int) -> dict:
    log = _run([sys.executable, "-m", "nfnet_hub.cli", "train", *_flags(setup, folder, out, "ours"), "--no-progress"],
               timeout)
    rates = [float(m.group(1)) for m in re.finditer(r"^epoch 1 step \d+/\d+ .* (\d+) img/s$", log, re.M)]
    if not rates:
        raise RuntimeError(f"no epoch-2 rate in our log: {log[-1500:]}")
    return {"img_s": rates[-1], "log_lines": len(rates)}


def timm(setup: dict, folder: Path, out: Path, timeout: int) -> dict:
    if not TIMM_TRAIN.is_file():
        return {"skipped": f"timm's train.py is not at {TIMM_TRAIN} (copy it there from a timm checkout)"}
    log = _run([sys.executable, "-m", "nfnet_hub.cli", "timm-train", str(TIMM_TRAIN),
                *_flags(setup, folder, out, "timm")], timeout)
    rates = [float(m.group(1)) for m in re.finditer(r"Train: 1 \[.*?\(\s*[\d.]+s,\s*([\d.]+)/s\)", log)]
    if not rates:
        raise RuntimeError(f"no epoch-2 rate in train.py's log: {log[-1500:]}")
    return {"img_s": rates[-1], "log_lines": len(rates)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="nano on the CPU with a tiny folder")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for trainer.json")
    p.add_argument("--timeout-s", type=int, default=140, help="limit of each trainer's run")
    p.add_argument("--repeats", type=int, default=3, help="runs of each trainer (saved after each pair)")
    args = p.parse_args()
    setup = SMOKE if args.smoke else FULL
    trainers = {"ours": ours, "timm_train_py": timm}
    runs: dict[str, list] = {name: [] for name in trainers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        folder = make_folder(tmp / "data", setup["classes"], setup["per_class"], setup["size"])
        print(f"synthetic folder: {setup['classes']} x {setup['per_class']} images in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        for repeat in range(args.repeats):
            for name in list(trainers)[::1 if repeat % 2 == 0 else -1]:  # who goes first alternates
                try:
                    runs[name].append(trainers[name](setup, folder, tmp / f"runs{repeat}", args.timeout_s))
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    runs[name].append({"error": str(e)[-1500:]})
                print(name, runs[name][-1], flush=True)
            save("trainer", summary(setup, runs), args.results)


def summary(setup: dict, runs: dict[str, list]) -> dict:
    """Each trainer's median over its runs that gave a rate (or its last failure), and ours / timm's."""
    results: dict = {"setup": setup}
    for name, measured in runs.items():
        rates = [r["img_s"] for r in measured if "img_s" in r]
        results[name] = {"img_s": statistics.median(rates), "runs": rates} if rates else measured[-1]
    if "img_s" in results["ours"] and "img_s" in results["timm_train_py"]:
        results["ours_vs_timm"] = results["ours"]["img_s"] / results["timm_train_py"]["img_s"]
    return results


if __name__ == "__main__":
    main()
