"""GPU benchmarks, all in one call of well under 8 minutes (run it when a device is lent):

    python benchmarks/gpu.py            # writes benchmarks/results/gpu.json
    python benchmarks/gpu.py --smoke    # every step on the CPU with nfnet_hub_nano: checks the script, not speed
    bash benchmarks/device.sh           # on a bare GPU machine: versions, then this script, results to $OUT

Against the anchors in the same run: folded vs timm's dm_nfnet_f0 (fp32 and bf16, batch 1 and 32);
our AGC vs timm's on F0's parameters with fresh gradients (default, and each method), its GPU time
against a plain copy of the same bytes, and its share of an F0 training step (GPU time, and the step
with against without it);
ONNX Runtime's CUDA provider (with onnxruntime-gpu) on our fp32 export vs timm's own export, our fp16
and int8 exports vs our fp32, each at batch 1 and 32 with inputs and outputs kept on the device; the
achieved GFLOP/s against the GPU's measured matmul peak; and `nfnet-hub serve` on the GPU against
OnnxClassifier (benchmarks/serve.py; skipped, with the reason, without onnxruntime-gpu and kserve).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, median_s, save, trained_like  # noqa: E402
from timm.utils.agc import adaptive_clip_grad  # noqa: E402

import nfnet_hub  # noqa: E402,F401
from nfnet_hub import agc_triton, fold  # noqa: E402
from nfnet_hub.agc import adaptive_clip_grad_, agc_parameters  # noqa: E402
from nfnet_hub.models.stats import model_stats  # noqa: E402


@dataclass(frozen=True)
class Setup:
    device: str
    anchor: str  # timm's model, the anchor of every comparison
    ours: str  # our model for the training step
    size: int
    batches: tuple[int, int]
    step_batch: int

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


SECTIONS = ("fold", "agc", "onnx", "serve")
FULL = Setup("cuda", "dm_nfnet_f0", "nfnet_hub_f0", 256, (1, 32), 64)
SMOKE = Setup("cpu", "nfnet_hub_nano", "nfnet_hub_nano", 64, (1, 2), 4)


def peak_tflops(s: Setup) -> dict:
    """Measured matmul throughput: fp32 (no TF32) and bf16, the yardsticks for achieved FLOP/s."""
    n = 8192 if s.device == "cuda" else 512
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, device=s.device, dtype=dtype), torch.randn(n, n, device=s.device, dtype=dtype)
        res[str(dtype)[6:]] = 2 * n ** 3 / median_s(lambda a=a, b=b: a @ b, runs=10, sync=s.sync) / 1e12
    return res


def bench_fold(s: Setup, ref: torch.nn.Module, peak: dict) -> dict:
    folded = fold(ref, img_size=s.size)
    flops = 2e9 * model_stats(s.anchor, s.size).gmacs
    res = {}
    for dtype in (torch.float32, torch.bfloat16):
        r, f = ref.to(dtype), folded.to(dtype)
        for batch in s.batches:
            x = torch.randn(batch, 3, s.size, s.size, device=s.device, dtype=dtype)
            with torch.inference_mode():
                t = median_s(lambda r=r, x=x: r(x), sync=s.sync) * 1e3
                o = median_s(lambda f=f, x=x: f(x), sync=s.sync) * 1e3
            kind = str(dtype)[6:]
            res[f"{kind}_b{batch}"] = {"timm_ms": t, "folded_ms": o, "speedup": t / o,
                                       "folded_tflops": flops * batch / o / 1e9,
                                       "fraction_of_peak": flops * batch / o / 1e9 / peak[kind]}
    ref.float()
    return res


def bench_agc_and_step(s: Setup) -> dict:
    model = trained_like(timm.create_model(s.ours)).to(s.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    size = s.size * 3 // 4  # the authors' training resolution is below the test one
    x = torch.randn(s.step_batch, 3, size, size, device=s.device)
    y = torch.randint(0, model.num_classes, (s.step_batch,), device=s.device)
    params = agc_parameters(model)

    def step(method: str | None):
        with torch.autocast(s.device, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if method:
            adaptive_clip_grad_(params, 0.01, method=method)
        opt.step()
        opt.zero_grad(set_to_none=True)

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    # interleaved rounds: the steps with AGC (as chosen, and grouped: does a growth follow the method?) and without
    # it see the same machine
    rounds: dict[str | None, list[float]] = {"auto": [], None: [], "grouped": []}
    for _ in range(3):
        for method in rounds:
            rounds[method].append(median_s(lambda method=method: step(method), runs=10, sync=s.sync) * 1e3)
    step_ms, step_without_agc_ms = (float(np.median(rounds[method])) for method in ("auto", None))
    finite = all(bool(p.isfinite().all()) for p in model.parameters())  # a diverged round times other numbers
    model.load_state_dict(weights)  # the unclipped steps on noise may have diverged: check AGC on sane weights
    model(x[:2]).logsumexp(1).mean().backward()  # a real gradient, not noise
    grads = [p.grad.clone() for p in params]

    def timed(fn) -> float:
        samples = []
        for _ in range(20):
            for p, g in zip(params, grads):
                p.grad = g.clone()  # fresh gradients each step, as in training
            s.sync()
            t = time.perf_counter()
            fn(params, 0.01)
            s.sync()
            samples.append(time.perf_counter() - t)
        return float(np.median(samples)) * 1e3

    def device_ms(fn, *args) -> float:
        """GPU time alone: the GPU sleeps while the host queues fn's kernels, so no launch gap is counted."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        samples = []
        for _ in range(20):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            torch.cuda.synchronize()
            torch.cuda._sleep(10_000_000)  # about 5 ms: far longer than the host needs to queue fn
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        return float(np.median(samples))

    def host_ms_behind_gpu_work() -> float:
        """Host time of one call queued behind about 10 ms of GPU work: a host sync inside it would wait that out."""
        samples = []
        for _ in range(5):
            for p, g in zip(params, grads):
                p.grad = g.clone()  # new addresses: the pointer table is rewritten, as when training reallocates
            torch.cuda.synchronize()
            torch.cuda._sleep(20_000_000)
            t = time.perf_counter()
            adaptive_clip_grad_(params, 0.01)
            samples.append(time.perf_counter() - t)
            torch.cuda.synchronize()
        return float(np.median(samples)) * 1e3

    def clipped(fn) -> list[torch.Tensor]:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        fn(params, 0.01)
        return [p.grad for p in params]

    def max_difference(fn, reference: list[torch.Tensor]) -> float:
        """Largest deviation from timm's clipped gradients, relative to each tensor's largest entry."""
        return max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()
                   for a, b in zip(clipped(fn), reference))

    # Triton only on the GPU: on the CPU it can run only through its interpreter, which says nothing of speed
    names = ["per_tensor", "grouped"] + ["triton"] * (s.device == "cuda" and agc_triton.usable(params, grads))
    methods = {m: (lambda ps, c, m=m: adaptive_clip_grad_(ps, c, method=m)) for m in names}
    default = "per_tensor" if s.device == "cpu" else names[-1]  # what method="auto" picks
    reference = clipped(adaptive_clip_grad)
    changed = sum(int((a != g).any()) for a, g in zip(reference, grads))  # a check that clips nothing proves nothing
    timm_ms, ours_ms = timed(adaptive_clip_grad), timed(adaptive_clip_grad_)
    gpu = {}
    if s.device == "cuda":  # AGC's floor is reading weights and gradients once: compare with a plain copy
        read = sum(2 * p.numel() * p.element_size() for p in params)
        src = torch.empty(read, dtype=torch.uint8, device=s.device)
        dst = torch.empty_like(src)
        ours_gpu_ms, copy_ms = device_ms(adaptive_clip_grad_, params, 0.01), device_ms(dst.copy_, src)
        gpu = {"ours_gpu_ms": ours_gpu_ms, "ours_gpu_share_of_step": ours_gpu_ms / step_ms,
               "host_ms_behind_gpu_work": host_ms_behind_gpu_work(),
               "ours_read_gb_s": read / ours_gpu_ms / 1e6, "copy_gb_s": 2 * read / copy_ms / 1e6}
        del src, dst
    return {**gpu, "train_step_ms_bf16": step_ms, "train_step_without_agc_ms": step_without_agc_ms,
            "agc_share_of_step": 1 - step_without_agc_ms / step_ms, "step_rounds_finite": finite,
            "train_step_grouped_agc_ms": float(np.median(rounds["grouped"])),
            "step_rounds_ms": {"agc": rounds["auto"], "without_agc": rounds[None], "grouped_agc": rounds["grouped"]},
            "step_batch": s.step_batch, "step_size": size, "timm_agc_ms": timm_ms,
            "ours_agc_ms": ours_ms, "ours_method": default,
            "speedup": timm_ms / ours_ms, "ours_share_of_step": ours_ms / step_ms,
            **{f"{m}_ms": timed(fn) for m, fn in methods.items()},
            "tensors_clipped_by_timm": changed, "tensors": len(params),
            "max_rel_difference_vs_timm": max(max_difference(fn, reference)
                                              for fn in (adaptive_clip_grad_, *methods.values()))}


def _device_runner(session, batch: int, s: Setup, provider: str):
    """session.run with input and output on the device: measures the model, not host copies."""
    import onnxruntime as ort

    device = "cuda" if provider == "CUDAExecutionProvider" else "cpu"
    x = np.random.default_rng(0).standard_normal((batch, 3, s.size, s.size)).astype(np.float32)
    binding = session.io_binding()
    binding.bind_ortvalue_input("pixel_values", ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output(session.get_outputs()[0].name, device)
    return lambda: session.run_with_iobinding(binding)


def bench_ort(s: Setup, ref: torch.nn.Module, peak: dict) -> dict:
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if s.device == "cuda" else "CPUExecutionProvider"
    if provider not in ort.get_available_providers():
        return {"skipped": "onnxruntime-gpu is not installed (pip install 'nfnet-hub[gpu]')"}
    from cpu import timm_onnx

    from nfnet_hub.export import export_onnx
    from nfnet_hub.onnx_graph import Fp32Graph

    flops = 2e9 * model_stats(s.anchor, s.size).gmacs
    res: dict = {"provider": provider}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cpu_ref = ref.cpu()
        timm_onnx(cpu_ref, tmp / "timm.onnx", s.size)
        calibration = np.random.default_rng(1).standard_normal((8, 3, s.size, s.size)).astype(np.float32)
        fp32_graph = Fp32Graph()
        for precision in ("fp32", "fp16", "int8"):
            export_onnx(cpu_ref, tmp / f"{precision}.onnx", img_size=s.size, precision=precision,
                        calibration=calibration, force=True, fp32_graph=fp32_graph)  # noise: speed, not accuracy
        ref.to(s.device)
        sessions = {}
        for name in ("timm", "fp32", "fp16", "int8"):
            try:  # a precision the provider cannot run is recorded, the others are still measured
                sessions[name] = ort.InferenceSession(str(tmp / f"{name}.onnx"), providers=[provider])
            except Exception as e:
                res[f"{name}_error"] = f"{type(e).__name__}: {e}"
        for batch in s.batches:
            ms: dict[str, list[float]] = {}
            for _ in range(3):  # interleaved rounds
                for name, session in sessions.items():
                    run = _device_runner(session, batch, s, provider)
                    ms.setdefault(name, []).append(median_s(run, runs=10, warmup=2) * 1e3)
            b = {f"{name}_ms": float(np.median(v)) for name, v in ms.items()}
            ratios = {"ours_vs_timm": ("fp32", "timm"), "fp16_speedup": ("fp32", "fp16"),
                      "int8_speedup": ("fp32", "int8")}
            b.update({k: b[f"{x}_ms"] / b[f"{y}_ms"] for k, (x, y) in ratios.items() if x in ms and y in ms})
            for name, kind in (("fp32", "float32"), ("fp16", "bfloat16")):
                if name in ms:
                    b[f"{name}_fraction_of_{kind}_peak"] = flops * batch / b[f"{name}_ms"] / 1e9 / peak[kind]
            res[f"b{batch}"] = b
    return res


def bench_serve(s: Setup, timeout_s: float) -> dict:
    """benchmarks/serve.py on this device, in its own process (the smoke run: nano only, on the CPU)."""
    import importlib.util
    import json
    import subprocess

    import onnxruntime as ort

    if s.device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"skipped": "onnxruntime-gpu is not installed (pip install 'nfnet-hub[serve,gpu]')"}
    missing = [m for m in ("kserve", "tritonclient") if importlib.util.find_spec(m) is None]
    if missing:
        return {"skipped": f"{' and '.join(missing)} not installed (pip install 'nfnet-hub[serve,gpu]' "
                           "'tritonclient[http]')"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, str(Path(__file__).with_name("serve.py")), "--device", s.device, "--results", tmp]
        subprocess.run(command + (["--quick"] if s.device == "cpu" else []), check=True, timeout=timeout_s)
        return json.loads(next(Path(tmp).glob("serve*.json")).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="run every step on the CPU with a tiny model")
    p.add_argument("--results", type=Path, help=f"folder for gpu.json (default: {RESULTS}; --smoke writes none)")
    p.add_argument("--budget-s", type=float, default=420, help="start no section after this many seconds")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS, help="what to measure (default: all)")
    args = p.parse_args()
    deadline = time.time() + args.budget_s
    s = SMOKE if args.smoke else FULL
    if s.device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run this on a GPU machine (or --smoke to check the script on the CPU)")
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # fp32 means fp32
    ref = trained_like(timm.create_model(s.anchor)).to(s.device)
    results: dict = {"setup": asdict(s), "peak_tflops": peak_tflops(s)}
    print("peak", results["peak_tflops"], flush=True)
    steps = (("fold", lambda: bench_fold(s, ref, results["peak_tflops"])), ("agc", lambda: bench_agc_and_step(s)),
             ("onnx", lambda: bench_ort(s, ref, results["peak_tflops"])),
             ("serve", lambda: bench_serve(s, max(30.0, deadline - time.time()))))
    for name, fn in steps:
        if name not in args.sections:
            continue
        if time.time() > deadline:
            results[name] = {"skipped": "time budget"}
            continue
        try:
            results[name] = fn()
        except Exception as e:  # record and go on: one failure must not cost the whole device slot
            results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(name, results[name], flush=True)
        if args.results or s is FULL:  # after every section: a run cut short keeps what it measured
            save("gpu", results, args.results or RESULTS)


if __name__ == "__main__":
    main()
