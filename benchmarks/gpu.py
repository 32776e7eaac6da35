"""GPU benchmarks, all in one call of well under 8 minutes (run it when a device is lent):

    python benchmarks/gpu.py            # writes benchmarks/results/gpu.json

Against the anchors in the same run: folded vs timm's dm_nfnet_f0 (fp32 and bf16, batch 1 and 32),
our AGC vs timm's on F0's parameters with fresh gradients and as a share of an F0 training step,
and ONNX Runtime's CUDA provider (when onnxruntime-gpu is installed) on our export vs timm's.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median_s, save, trained_like  # noqa: E402
from timm.utils.agc import adaptive_clip_grad  # noqa: E402

import nfnet_hub  # noqa: E402,F401
from nfnet_hub import fold  # noqa: E402
from nfnet_hub.agc import adaptive_clip_grad_, agc_parameters  # noqa: E402

SIZE, DEADLINE = 256, time.time() + 7 * 60


def sync() -> None:
    torch.cuda.synchronize()


def bench_fold(ref) -> dict:
    folded = fold(ref, img_size=SIZE)
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        r, f = ref.to(dtype), folded.to(dtype)
        for batch in (1, 32):
            x = torch.randn(batch, 3, SIZE, SIZE, device="cuda", dtype=dtype)
            with torch.inference_mode():
                t = median_s(lambda r=r, x=x: r(x), sync=sync) * 1e3
                o = median_s(lambda f=f, x=x: f(x), sync=sync) * 1e3
            res[f"{str(dtype)[6:]}_b{batch}"] = {"timm_ms": t, "folded_ms": o, "speedup": t / o}
    ref.float()
    return res


def bench_agc_and_step() -> dict:
    model = trained_like(timm.create_model("nfnet_hub_f0")).cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    x, y = torch.randn(64, 3, 192, 192, device="cuda"), torch.randint(0, 1000, (64,), device="cuda")
    params = agc_parameters(model)

    def step(clip=None):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if clip:
            clip(params, 0.01)
        opt.step()
        opt.zero_grad(set_to_none=True)

    step_ms = median_s(step, runs=10, sync=sync) * 1e3
    model(x[:8]).logsumexp(1).mean().backward()
    grads = [p.grad.clone() for p in params]

    def timed(fn) -> float:
        samples = []
        for _ in range(20):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            sync()
            t = time.perf_counter()
            fn(params, 0.01)
            sync()
            samples.append(time.perf_counter() - t)
        return float(np.median(samples)) * 1e3

    timm_ms, ours_ms = timed(adaptive_clip_grad), timed(adaptive_clip_grad_)
    return {"train_step_ms_f0_b64_bf16": step_ms, "timm_agc_ms": timm_ms, "ours_agc_ms": ours_ms,
            "speedup": timm_ms / ours_ms, "ours_share_of_step": ours_ms / step_ms}


def bench_ort(ref) -> dict:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "onnxruntime-gpu is not installed (pip install nfnet-hub[gpu])"}
    from cpu import timm_onnx

    from nfnet_hub.export import export_onnx

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cpu_ref = ref.cpu()
        timm_onnx(cpu_ref, tmp / "timm.onnx")
        export_onnx(cpu_ref, tmp / "ours.onnx", img_size=SIZE)
        export_onnx(cpu_ref, tmp / "fp16.onnx", img_size=SIZE, precision="fp16")
        for name in ("timm", "ours", "fp16"):
            s = ort.InferenceSession(str(tmp / f"{name}.onnx"), providers=["CUDAExecutionProvider"])
            for batch in (1, 32):
                x = np.random.default_rng(0).standard_normal((batch, 3, SIZE, SIZE)).astype(np.float32)
                res[f"{name}_b{batch}_ms"] = median_s(lambda s=s, x=x: s.run(None, {"pixel_values": x})) * 1e3
    for batch in (1, 32):
        res[f"ours_vs_timm_b{batch}"] = res[f"ours_b{batch}_ms"] / res[f"timm_b{batch}_ms"]
    return res


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run this on a GPU machine")
    torch.backends.cudnn.benchmark = True
    ref = trained_like(timm.create_model("dm_nfnet_f0")).cuda()
    results = {}
    for name, fn in (("fold", lambda: bench_fold(ref)), ("agc", bench_agc_and_step), ("onnx", lambda: bench_ort(ref))):
        if time.time() > DEADLINE:
            results[name] = {"skipped": "time budget"}
            continue
        try:
            results[name] = fn()
        except Exception as e:  # record and go on: one failure must not cost the whole device slot
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, results[name], flush=True)
    save("gpu", results)


if __name__ == "__main__":
    main()
