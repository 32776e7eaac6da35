"""int8 on any x86 CPU: which quantisation settings keep accuracy with and without VNNI, and how fast they run.

Without VNNI (AVX2 only, e.g. AMD EPYC Milan), ONNX Runtime's u8 x s8 kernels add pairs of 8-bit
products in 16 bits with saturation, so the same int8 file can lose points there and none on a CPU
with VNNI. For each setting this trains the quickstart's model (nano on digits) with several seeds,
quantises it, and measures accuracy on the held-out digits here and on an emulated EPYC-Milan (qemu
user mode, `apt-get install qemu-user`; skipped without it). Then it times F0 at 256 px, fp32 against
the settings, here, and the export's fp32 and int8 at opset 17 (older runtimes: GELU written as its formula).

    python benchmarks/int8.py            # about 15 minutes on 2 cores; writes benchmarks/results/int8.json
    python benchmarks/int8.py --smoke    # every step, small (one seed, one epoch, nano): what the tests run
    python benchmarks/int8.py --name int8_no_vnni   # on a real CPU without VNNI (AVX2 only): is qemu faithful?
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import timm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, median_s, save, trained_like  # noqa: E402

import nfnet_hub  # noqa: E402,F401
from nfnet_hub.export import export_onnx  # noqa: E402
from nfnet_hub.export_limits import MIN_OPSET  # noqa: E402
from nfnet_hub.int8 import quantize_int8  # noqa: E402
from nfnet_hub.quickstart import CALIBRATION, train_args  # noqa: E402
from nfnet_hub.train import parse_args, train  # noqa: E402
from nfnet_hub.train.data import digits_split, digits_to_tensor  # noqa: E402

SEEDS = (0, 1, 2, 42)  # 42: the quickstart's own
# name -> quantize_int8 settings (and "images": calibration images); the first is what export used before,
# the last what it uses now
SETTINGS = {
    "8-bit weights (before)": dict(reduce_range=False, keep_fp32=False),
    "7-bit weights (reduce_range)": dict(keep_fp32=False),
    "s8 activations (s8 x s8)": dict(reduce_range=False, keep_fp32=False, activations="s8"),
    "u8 weights (u8 x u8)": dict(reduce_range=False, keep_fp32=False, weights="u8"),
    "percentile calibration": dict(reduce_range=False, keep_fp32=False, method="percentile"),
    "entropy calibration": dict(reduce_range=False, keep_fp32=False, method="entropy"),
    "4x the calibration images": dict(reduce_range=False, keep_fp32=False, images=4 * CALIBRATION),
    "stem conv and classifier in fp32": dict(reduce_range=False),
    "7-bit + stem conv and classifier in fp32 (export)": dict(),
}
SPEED = ("8-bit weights (before)", "s8 activations (s8 x s8)", "u8 weights (u8 x u8)",
         "7-bit + stem conv and classifier in fp32 (export)")
EMULATED_CPU = "EPYC-Milan"  # AVX2 and FMA, neither AVX-512 nor VNNI
_EVALUATE = """
import json, sys, numpy as np, onnxruntime as ort
x, out = np.load(sys.argv[1]), {}
for path in sys.argv[3:]:
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    out[path] = s.run(None, {"pixel_values": x})[0].argmax(-1).tolist()
json.dump(out, open(sys.argv[2], "w"))
"""


def _predictions(paths: list[Path], x: np.ndarray, tmp: Path, emulate: bool) -> dict[str, list[int]]:
    np.save(tmp / "x.npy", x)
    command = [sys.executable, "-c", _EVALUATE, str(tmp / "x.npy"), str(tmp / "pred.json"), *map(str, paths)]
    if emulate:
        command = ["qemu-x86_64", "-cpu", EMULATED_CPU, *command]
    subprocess.run(command, check=True, capture_output=True)
    return json.loads((tmp / "pred.json").read_text())


def accuracy(emulate: bool, seeds: tuple[int, ...] = SEEDS, epochs: int = 10) -> dict:
    xtr, xte, _, yte = digits_split()
    x, calibration_pool = digits_to_tensor(xte, 32).numpy(), digits_to_tensor(xtr, 32).numpy()
    results: dict = {name: {} for name in SETTINGS}
    for seed in seeds:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            run = train(parse_args([*train_args(epochs), "--seed", str(seed), "--output", str(tmp), "--no-progress",
                                    "--log-interval", "0"]))
            export_onnx(run["model"].eval(), tmp / "fp32.onnx")
            fp32 = onnx.load(tmp / "fp32.onnx")
            paths = [tmp / "fp32.onnx"]
            for i, setting in enumerate(SETTINGS.values()):
                setting = dict(setting)
                n = setting.pop("images", CALIBRATION)
                images = calibration_pool[::max(1, len(calibration_pool) // n)][:n]
                held = np.arange(len(images)) % 5 == 4  # as export does: calibrate on four fifths
                onnx.save(quantize_int8(fp32, images[~held], **setting), tmp / f"{i}.onnx")
                paths.append(tmp / f"{i}.onnx")
            here = _predictions(paths, x, tmp, emulate=False)
            there = _predictions(paths, x, tmp, emulate=True) if emulate else {}
            acc = lambda p: float((np.array(p) == yte).mean() * 100)  # noqa: E731
            for i, name in enumerate(SETTINGS):
                path = str(tmp / f"{i}.onnx")
                results[name][seed] = {"fp32": acc(here[str(paths[0])]), "here": acc(here[path]),
                                       **({"emulated": acc(there[path])} if emulate else {})}
            print(f"seed {seed}:", json.dumps({n: r[seed] for n, r in results.items()}), flush=True)
    return results


def speed(name: str = "nfnet_hub_f0", size: int = 256) -> dict:
    model = trained_like(timm.create_model(name))
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(model, tmp / "fp32.onnx", img_size=size)
        export_onnx(model, tmp / "fp32_old.onnx", img_size=size, opset=MIN_OPSET)  # GELU as its formula
        calibration = rng.standard_normal((16, 3, size, size)).astype(np.float32)  # speed does not depend on it
        files = {"fp32": tmp / "fp32.onnx"}
        for i, setting_name in enumerate(SPEED):
            setting = {k: v for k, v in SETTINGS[setting_name].items() if k != "images"}
            onnx.save(quantize_int8(onnx.load(tmp / "fp32.onnx"), calibration, **setting), tmp / f"{i}.onnx")
            files[setting_name] = tmp / f"{i}.onnx"
        files[f"fp32, opset {MIN_OPSET}"] = tmp / "fp32_old.onnx"  # for runtimes before ONNX Runtime 1.17
        onnx.save(quantize_int8(onnx.load(tmp / "fp32_old.onnx"), calibration), tmp / "int8_old.onnx")
        files[f"{SPEED[-1]}, opset {MIN_OPSET}"] = tmp / "int8_old.onnx"
        sessions = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in files.items()}
        out: dict = {}
        for batch, runs in ((1, 10), (8, 3)):
            x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            ms: dict[str, list[float]] = {}
            for _ in range(3):  # interleaved rounds
                for k, s in sessions.items():
                    ms.setdefault(k, []).append(median_s(lambda s=s, x=x: s.run(None, {"pixel_values": x}), runs=runs,
                                                         warmup=1) * 1e3)
            med = {k: float(np.median(v)) for k, v in ms.items()}
            out[f"b{batch}"] = {k: {"ms": v, "speedup": med["fp32"] / v} for k, v in med.items()}
            print(f"{name} batch {batch}:", json.dumps(out[f"b{batch}"]), flush=True)
    return {"model": name, "img_size": size, **out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--no-emulation", action="store_true", help="measure on this CPU only")
    p.add_argument("--smoke", action="store_true", help="one seed, one epoch, nano's speed, no emulation")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder for the results file")
    p.add_argument("--name", default="int8", help="the results file's name: int8_no_vnni for a run on a real CPU "
                   "without VNNI, which report.py sets beside the main run")
    args = p.parse_args()
    emulate = not (args.no_emulation or args.smoke) and shutil.which("qemu-x86_64") is not None
    vnni = {"avx512_vnni", "avx_vnni"} & set(machine().get("cpu_flags", []))
    if args.name == "int8_no_vnni" and (vnni or not emulate):  # what report.py compares it with
        p.error("--name int8_no_vnni is a run on a CPU without VNNI, compared with its emulation: "
                + (f"this CPU has {', '.join(sorted(vnni))}" if vnni else "it needs qemu-x86_64 (apt-get install "
                   "qemu-user) and neither --no-emulation nor --smoke"))
    if not emulate:
        print("not emulating a CPU without VNNI: accuracy is measured here only", flush=True)
    seeds, epochs, model = ((0,), 1, ("nfnet_hub_nano", 32)) if args.smoke else (SEEDS, 10, ("nfnet_hub_f0", 256))
    save(args.name, {"emulated_cpu": EMULATED_CPU if emulate else None, "seeds": list(seeds),
                     "calibration_images": CALIBRATION, "accuracy": accuracy(emulate, seeds, epochs),
                     "speed": speed(*model)}, args.results)


if __name__ == "__main__":
    main()
