"""CPU benchmarks against the anchors, in one run: timm's dm_nfnet_f0 (eager and folded PyTorch),
timm's AGC, and timm's own ONNX export of dm_nfnet_f0 under ONNX Runtime.

    python benchmarks/cpu.py            # writes benchmarks/results/cpu.json
"""
from __future__ import annotations

import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

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
from nfnet_hub.export import export_onnx  # noqa: E402
from nfnet_hub.folding import prepack  # noqa: E402
from nfnet_hub.models.stats import model_stats  # noqa: E402

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
        ours = export_onnx(ref, tmp / "ours.onnx", img_size=SIZE)
        calib = np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
        int8 = export_onnx(ref, tmp / "int8.onnx", img_size=SIZE, precision="int8", calibration=calib)
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


def main() -> None:
    torch.manual_seed(0)
    peak, bandwidth = peak_gflops(), copy_gbps()
    print(f"machine: matmul peak {peak:.0f} GFLOP/s, copy bandwidth {bandwidth:.1f} GB/s", flush=True)
    ref = trained_like(timm.create_model("dm_nfnet_f0"))
    results = {"peak_gflops": peak, "copy_gbps": bandwidth}
    results["fold"] = bench_fold(ref)
    print("fold:", results["fold"], flush=True)
    results["agc"] = bench_agc(trained_like(timm.create_model("nfnet_hub_f0")), bandwidth)
    print("agc:", results["agc"], flush=True)
    results["onnx"] = bench_onnx(ref, peak)
    print("onnx:", results["onnx"], flush=True)
    save("cpu", results)


if __name__ == "__main__":
    main()
