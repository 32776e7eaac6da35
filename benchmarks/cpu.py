"""CPU benchmarks against the anchors, in one run (each section in its own process): timm's
dm_nfnet_f0 (eager and folded PyTorch), timm's AGC, timm's own ONNX export of dm_nfnet_f0 under
ONNX Runtime, and timm's image-folder dataset.

    python benchmarks/cpu.py [--repeat 3]     # writes benchmarks/results/cpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_s, save, trained_like  # noqa: E402
from timm.utils.agc import adaptive_clip_grad  # noqa: E402

import nfnet_hub  # noqa: E402,F401
from nfnet_hub import fold  # noqa: E402
from nfnet_hub.agc import adaptive_clip_grad_, agc_parameters  # noqa: E402
from nfnet_hub.cpu import prepack  # noqa: E402
from nfnet_hub.export import export_onnx  # noqa: E402
from nfnet_hub.models.stats import model_stats  # noqa: E402
from nfnet_hub.onnx_graph import Fp32Graph  # noqa: E402

SIZE = 256


def peak_gflops() -> float:
    """Measured fp32 matrix-multiply throughput (the best of torch and ONNX Runtime): the machine's
    practical peak, which convolutions are compared to."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch_s = median_s(lambda: a @ b, runs=10)
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"a": a.numpy(), "b": b.numpy()}
    ort_s = median_s(lambda: session.run(None, feeds), runs=10)
    return 2 * n ** 3 / min(torch_s, ort_s) / 1e9


def copy_gbps() -> float:
    src = torch.randn(64 * 2 ** 20)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / median_s(lambda: dst.copy_(src), runs=10) / 1e9


def bench_fold(ref: torch.nn.Module) -> dict:
    folded = fold(ref, img_size=SIZE)
    eager = {"timm_eager_ms": ref, "folded_eager_ms": folded, "prepacked_eager_ms": prepack(folded)}
    x = torch.randn(1, 3, SIZE, SIZE)
    out = {}
    with torch.inference_mode():
        for _ in range(5):  # interleave the models so drift hits all alike
            for key, model in eager.items():
                out.setdefault(key, []).append(median_s(lambda model=model: model(x), runs=7) * 1e3)
    res = {k: float(np.median(v)) for k, v in out.items()}
    res["eager_speedup"] = res["timm_eager_ms"] / res["folded_eager_ms"]
    res["prepacked_speedup"] = res["timm_eager_ms"] / res["prepacked_eager_ms"]
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # weights become constants: what an inference server compiles
    with torch.inference_mode():
        timm_c, fold_c = torch.compile(ref), torch.compile(folded)
        res["timm_compiled_ms"] = median_s(lambda: timm_c(x), runs=10) * 1e3
        res["folded_compiled_ms"] = median_s(lambda: fold_c(x), runs=10) * 1e3
    res["folded_compiled_vs_timm_eager"] = res["timm_eager_ms"] / res["folded_compiled_ms"]
    res["compiled_speedup"] = res["timm_compiled_ms"] / res["folded_compiled_ms"]
    return res


def bench_agc(model: torch.nn.Module, bandwidth: float) -> dict:
    model.train()
    model.zero_grad()
    model(torch.randn(8, 3, 64, 64)).logsumexp(1).mean().backward()  # a real gradient, not noise
    params = agc_parameters(model)
    grads = [p.grad.clone() for p in params]

    def fresh():  # new gradients each step, as in training
        for p, g in zip(params, grads):
            p.grad = g.clone()

    def one(fn):
        samples = []
        for _ in range(9):
            fresh()
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return float(np.median(samples))

    timm_s = one(lambda: adaptive_clip_grad(params, 0.01))
    ours_s = one(lambda: adaptive_clip_grad_(params, 0.01))
    nbytes = sum(p.numel() * p.element_size() for p in params)
    moved = 2 * nbytes  # the floor: read weights and gradients once (few units clip, few rows are written)
    return {"params": len(params), "megabytes": nbytes / 1e6, "timm_ms": timm_s * 1e3, "ours_ms": ours_s * 1e3,
            "speedup": timm_s / ours_s, "ours_gbps": moved / ours_s / 1e9, "copy_gbps": bandwidth,
            "fraction_of_copy_bandwidth": moved / ours_s / 1e9 / bandwidth}


def timm_onnx(model: torch.nn.Module, path: Path, size: int = SIZE) -> None:
    """timm's own model through torch's dynamo exporter, dynamic batch: the anchor of our export."""
    x = torch.zeros(2, 3, size, size)
    with contextlib.redirect_stdout(io.StringIO()):
        prog = torch.onnx.export(model, (x,), input_names=["pixel_values"], dynamo=True, external_data=False,
                                 dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},), opset_version=20)
    prog.save(str(path))


def bench_onnx(ref: torch.nn.Module, peak: float) -> dict:
    gmacs = model_stats("dm_nfnet_f0", SIZE).gmacs
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        timm_onnx(ref, tmp / "timm.onnx")
        fp32_graph = Fp32Graph()
        ours = export_onnx(ref, tmp / "ours.onnx", img_size=SIZE, fp32_graph=fp32_graph)
        calib = np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
        int8 = export_onnx(ref, tmp / "int8.onnx", img_size=SIZE, precision="int8", calibration=calib, force=True,
                           fp32_graph=fp32_graph)  # noise calibrates speed, not accuracy (benchmarks/int8.py does)
        res = {"timm_nodes": len(onnx.load(tmp / "timm.onnx").graph.node), "ours_nodes": ours.nodes,
               "timm_mb": (tmp / "timm.onnx").stat().st_size / 1e6, "ours_mb": ours.file_bytes / 1e6,
               "weights_mb": ours.weight_bytes / 1e6, "int8_mb": int8.file_bytes / 1e6}
        sessions = {k: ort.InferenceSession(str(tmp / f"{k}.onnx"), providers=["CPUExecutionProvider"])
                    for k in ("timm", "ours", "int8")}
        for batch in (1, 8):
            x = np.random.default_rng(1).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
            runs = 10 if batch == 1 else 4
            ms = {}
            for _ in range(3):  # interleaved rounds
                for k, s in sessions.items():
                    ms.setdefault(k, []).append(median_s(lambda s=s, x=x: s.run(None, {"pixel_values": x}),
                                                         runs=runs, warmup=1) * 1e3)
            ms = {k: float(np.median(v)) for k, v in ms.items()}
            res[f"b{batch}"] = {**{f"{k}_ms": v for k, v in ms.items()},
                                "ours_vs_timm": ms["ours"] / ms["timm"], "int8_speedup": ms["ours"] / ms["int8"],
                                "ours_gflops": 2 * gmacs * batch / (ms["ours"] / 1e3),
                                "fraction_of_peak": 2 * gmacs * batch / (ms["ours"] / 1e3) / peak}
    return res


def bench_loader() -> dict:
    """Reading an image folder for training, per image, timm's train transform at 224 px included: timm's
    ImageDataset, and the same dataset reading images as the runtime does (ReadAsRuntime: one more header parse
    per image, to find 16-bit ones). Real JPEG photos from scikit-image."""
    from PIL import Image
    from skimage import data
    from timm.data import create_dataset, create_transform

    from nfnet_hub.train.data import ReadAsRuntime

    with tempfile.TemporaryDirectory() as tmp:
        for name in ("astronaut", "chelsea", "coffee"):
            (Path(tmp) / "train" / name).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(getattr(data, name)()).save(Path(tmp) / "train" / name / f"{i}.jpg", quality=90)
        datasets = {}
        for key in ("timm", "ours"):
            ds = create_dataset("", root=tmp, split="train", is_training=True, input_img_mode="RGB")
            ds.transform = create_transform(224, is_training=True)
            datasets[key] = ReadAsRuntime.wrap(ds) if key == "ours" else ds
        ms = {}
        for _ in range(5):  # interleaved rounds
            for key, ds in datasets.items():
                ms.setdefault(key, []).append(median_s(lambda ds=ds: [ds[i] for i in range(len(ds))], runs=5)
                                              / len(ds) * 1e3)
    res = {f"{k}_ms": float(np.median(v)) for k, v in ms.items()}
    return {**res, "ours_vs_timm": res["ours_ms"] / res["timm_ms"]}


SECTIONS = {
    "fold": lambda peak: bench_fold(trained_like(timm.create_model("dm_nfnet_f0"))),
    "agc": lambda peak: bench_agc(trained_like(timm.create_model("nfnet_hub_f0")), copy_gbps()),
    "onnx": lambda peak: bench_onnx(trained_like(timm.create_model("dm_nfnet_f0")), peak),
    "loader": lambda peak: bench_loader(),
}


SPREAD = (("fold", "prepacked_speedup"), ("fold", "eager_speedup"), ("agc", "speedup"), ("onnx", "b1", "ours_vs_timm"),
          ("onnx", "b8", "ours_vs_timm"), ("onnx", "b1", "int8_speedup"), ("onnx", "b8", "int8_speedup"),
          ("loader", "ours_vs_timm"))


def _median(runs: list) -> Any:
    """Element-wise median of repeated results (numbers), the first run's value otherwise."""
    if isinstance(runs[0], dict):
        return {k: _median([r[k] for r in runs]) for k in runs[0]}
    if isinstance(runs[0], bool):
        return runs[0]
    if isinstance(runs[0], int):
        return statistics.median_low(runs)
    if isinstance(runs[0], float):
        return statistics.median(runs)
    return runs[0]


def _section(name: str, peak: float) -> dict:
    run = subprocess.run([sys.executable, __file__, "--section", name, "--peak", str(peak)], capture_output=True,
                         text=True)
    if run.returncode:
        sys.exit(f"the {name} benchmark failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    """Each section runs in a process of its own (what one leaves behind, compiled graphs or memory in
    other pages, measurably slows the memory-bound ones that follow), and the whole set ``--repeat``
    times, interleaved: this shared machine drifts by 10% between runs, so medians and ranges are kept."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="runs of every section (default 3)")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--peak", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.manual_seed(0)
    if args.section:
        print(json.dumps(SECTIONS[args.section](args.peak)))
        return
    peak = peak_gflops()
    print(f"machine: matmul peak {peak:.0f} GFLOP/s", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in SECTIONS}
    for i in range(args.repeat):
        for name in SECTIONS:
            runs[name].append(_section(name, peak))
            print(f"run {i + 1}/{args.repeat} {name}:", runs[name][-1], flush=True)
    results = {"peak_gflops": peak, "repeat": args.repeat, **{name: _median(r) for name, r in runs.items()}}
    results["copy_gbps"] = results["agc"]["copy_gbps"]  # measured beside each AGC run, on the same memory state
    results["spread"] = {}
    for path in SPREAD:
        values = []
        for run in runs[path[0]]:
            for key in path[1:]:
                run = run[key]
            values.append(run)
        results["spread"][".".join(path)] = [min(values), max(values)]
    save("cpu", results)


if __name__ == "__main__":
    main()
