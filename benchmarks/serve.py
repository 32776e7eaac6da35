"""`nfnet-hub serve` under bounded loopback load, against OnnxClassifier on the same batch sizes.

For nano and F0 (trained-like gains, the bundle's eval size): requests/s and p50/p99 latency at
concurrency 1, 8 and 32 (closed loop: each of C tritonclient workers sends one image at a time, a
fixed number of requests each), beside the raw batched throughput of ``OnnxClassifier.logits`` at
batch C in the same run. Goals: at concurrency 32 the server delivers >= 0.8x the raw throughput, and
p99 stays under max-delay + 2x the raw compute time of the batch. Also cold start: seconds from
starting `nfnet-hub serve` to the first answer for F0, against a process that opens an ONNX Runtime
session on timm's own export of dm_nfnet_f0 (whose weight standardisation the session folds) and runs it.

    python benchmarks/serve.py [--device cpu|cuda] [--quick]     # results: benchmarks/results/serve.json
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import timm
from common import machine, median_s, save, trained_like

import nfnet_hub  # noqa: F401  (registers the models)
from nfnet_hub.hub import build_bundle
from nfnet_hub.runtime import OnnxClassifier

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from serving import Server  # noqa: E402

MAX_DELAY_MS = 5.0


def bundle(variant: str, out: Path) -> Path:
    model = trained_like(timm.create_model(variant, num_classes=1000))
    return build_bundle(model, out, progress=False, precisions=("fp32",))


def load(url: str, name: str, x: np.ndarray, concurrency: int, requests_each: int, binary: bool = True) -> dict:
    """Closed-loop load: ``concurrency`` workers, each sending ``requests_each`` requests of ``x`` (binary
    tensor data, or JSON)."""
    from tritonclient.http import InferenceServerClient, InferInput, InferRequestedOutput

    latencies: list[float] = []
    errors: list[str] = []

    def worker():
        client = InferenceServerClient(url.removeprefix("http://"), network_timeout=300, connection_timeout=60)
        pixels = InferInput("pixel_values", list(x.shape), "FP32")
        pixels.set_data_from_numpy(x, binary_data=binary)
        outputs = [InferRequestedOutput("logits", binary_data=binary)]
        for _ in range(requests_each):
            t = time.perf_counter()
            try:
                client.infer(name, [pixels], outputs=outputs)
            except Exception as e:  # recorded, never hidden
                errors.append(str(e)[:200])
            latencies.append(time.perf_counter() - t)
        client.close()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "errors": len(errors), "first_failure": errors[0] if errors else None,
            "requests_per_s": len(latencies) / wall, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99))}


def bench_model(name: str, path: Path, device: str, concurrencies: list[int], requests_each: int) -> dict:
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    clf = OnnxClassifier.from_pretrained(path, providers=providers)
    h, w = clf.preprocess.input_size
    rng = np.random.default_rng(0)
    results = {"input": f"3x{h}x{w}", "levels": {}}
    batches = {c: rng.standard_normal((c, 3, h, w)).astype(np.float32) for c in concurrencies}
    raw_s = {c: median_s(lambda b=b: clf.logits(b), runs=5, warmup=1) for c, b in batches.items()}
    clf = None  # its idle threads would compete with the server for the machine's cores
    with Server(str(path), "--name", name, "--max-batch-size", "32", "--max-delay-ms", str(MAX_DELAY_MS),
                "--device", device, threads=False) as url:
        for c in concurrencies:
            served = load(url, name, batches[c][:1], c, requests_each)
            raw_ips = c / raw_s[c]
            level = {"raw_batch_ms": raw_s[c] * 1e3, "raw_images_per_s": raw_ips, **served,
                     "ratio_to_raw": served["requests_per_s"] / raw_ips,
                     "p99_bound_ms": MAX_DELAY_MS + 2 * raw_s[c] * 1e3}
            level["p99_within_bound"] = level["p99_ms"] <= level["p99_bound_ms"]
            results["levels"][str(c)] = level
            print(f"{name} c={c:>2}: {served['requests_per_s']:8.1f} req/s (raw batch {c}: {raw_ips:8.1f} img/s, "
                  f"{level['ratio_to_raw']:.2f}x)  p50 {served['p50_ms']:7.1f} ms  p99 {served['p99_ms']:7.1f} ms "
                  f"(bound {level['p99_bound_ms']:.1f})  errors {served['errors']}", flush=True)
    return results


def cold_start_serve(path: Path, size: int, device: str) -> float:
    """Seconds from starting `nfnet-hub serve` to its first answer."""
    from tritonclient.http import InferenceServerClient, InferInput

    t = time.perf_counter()
    with Server(str(path), "--name", "f0", "--device", device, threads=False, poll_s=0.02) as url:
        h = size
        pixels = InferInput("pixel_values", [1, 3, h, h], "FP32")
        pixels.set_data_from_numpy(np.zeros((1, 3, h, h), np.float32))
        InferenceServerClient(url.removeprefix("http://")).infer("f0", [pixels])
        return time.perf_counter() - t


def cold_start_timm(path: Path, size: int, device: str) -> float:
    """Seconds from starting a process that opens ONNX Runtime on timm's dm_nfnet_f0 export to its first answer."""
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    code = (f"import numpy as np, onnxruntime as ort; s = ort.InferenceSession({str(path)!r}, providers={providers});"
            f"s.run(None, {{'pixel_values': np.zeros((1, 3, {size}, {size}), np.float32)}})")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="nano only, few requests (a smoke run)")
    p.add_argument("--results", type=Path, help="folder for serve.json (default: benchmarks/results)")
    args = p.parse_args()
    out = {"machine": machine(), "device": args.device, "max_delay_ms": MAX_DELAY_MS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {"nano": ("nfnet_hub_nano", 40)} if args.quick else {"nano": ("nfnet_hub_nano", 40),
                                                                          "f0": ("nfnet_hub_f0", 4)}
        for name, (variant, requests_each) in variants.items():
            print(f"building the {name} bundle ...", flush=True)
            path = bundle(variant, work / name)
            out["models"][name] = bench_model(name, path, args.device, [1, 8, 32], 2 if args.quick else requests_each)
            if name == "f0":
                size = OnnxClassifier.from_pretrained(path).preprocess.input_size[0]
                from cpu import timm_onnx

                timm_onnx(trained_like(timm.create_model("dm_nfnet_f0")), work / "timm_f0.onnx", size)
                runs = [(cold_start_serve(path, size, args.device), cold_start_timm(work / "timm_f0.onnx", size,
                                                                                   args.device)) for _ in range(5)]
                ours, theirs = (statistics.median(r[i] for r in runs) for i in (0, 1))  # interleaved: same noise
                out["cold_start_s"] = {"nfnet_hub_serve_f0": ours, "ort_session_timm_dm_nfnet_f0": theirs,
                                       "ratio": ours / theirs}
                print(f"cold start F0: nfnet-hub serve {ours:.2f} s to the first answer; ONNX Runtime on timm's "
                      f"dm_nfnet_f0 export {theirs:.2f} s ({ours / theirs:.2f}x)", flush=True)
    kw = {"directory": args.results} if args.results else {}
    print(f"saved {save('serve' if args.device == 'cpu' else 'serve_gpu', out, **kw)}")


if __name__ == "__main__":
    main()
