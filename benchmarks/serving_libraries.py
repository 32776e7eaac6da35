"""The choice of serving library, measured: KServe's model server (under `nfnet-hub serve`) against
MLServer, both Open Inference Protocol v2 servers in Python, on the same nano bundle and client.

MLServer's REST API has no binary tensor extension, so both are driven with JSON requests (tritonclient
with binary_data=False), one image per request, at concurrency 1 and 32, with each server's own batching
(ours: --max-delay-ms 5; MLServer's adaptive batching: max_batch_time 5 ms). MLServer runs from its own
environment (it pins other FastAPI and protobuf versions than KServe):

    python3.11 -m venv /tmp/mls && /tmp/mls/bin/pip install mlserver onnxruntime pillow && \\
        /tmp/mls/bin/pip install --no-deps .
    python benchmarks/serving_libraries.py --mlserver /tmp/mls/bin/mlserver
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
from common import machine, save
from serve import bundle, load  # (serve puts tests/ on the path, for serving)
from serving import Server, free_port

RUNTIME = textwrap.dedent('''
    from mlserver import MLModel
    from mlserver.codecs import NumpyCodec
    from mlserver.types import InferenceResponse

    from nfnet_hub.runtime import OnnxClassifier


    class Bundle(MLModel):
        async def load(self) -> bool:
            self.clf = OnnxClassifier.from_pretrained(self.settings.parameters.uri, threads=1)
            return True

        async def predict(self, payload):
            logits = self.clf.logits(NumpyCodec.decode_input(payload.inputs[0]))
            return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)])
''')


def mlserver(command: str, path: Path, work: Path, port: int):
    """Starts MLServer on the bundle; the process, once its model is ready."""
    (work / "runtime.py").write_text(RUNTIME)
    (work / "settings.json").write_text(json.dumps({"http_port": port, "grpc_port": free_port(),
                                                    "metrics_port": free_port(), "parallel_workers": 0}))
    (work / "model-settings.json").write_text(json.dumps({
        "name": "nano", "implementation": "runtime.Bundle", "parameters": {"uri": str(path)},
        "max_batch_size": 32, "max_batch_time": 0.005}))
    proc = subprocess.Popen([command, "start", str(work)], cwd=work, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/models/nano/ready", timeout=2).status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("MLServer was not ready in 120 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mlserver", required=True, help="the mlserver command of an environment that has it")
    p.add_argument("--requests", type=int, default=100, help="requests per worker at concurrency 1 (32: a tenth)")
    args = p.parse_args()
    out = {"machine": machine(), "requests": "JSON, one image (3x32x32) each", "servers": {}}
    levels = ((1, args.requests), (32, max(1, args.requests // 10)))  # (concurrency, requests per worker)
    with tempfile.TemporaryDirectory() as tmp:
        path = bundle("nfnet_hub_nano", Path(tmp) / "nano")
        x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
        with Server(str(path), "--name", "nano", "--threads", "1", threads=False) as url:
            out["servers"]["kserve (nfnet-hub serve)"] = {c: load(url, "nano", x, c, n, binary=False)
                                                          for c, n in levels}
        port = free_port()
        proc = mlserver(args.mlserver, path, Path(tmp), port)
        try:
            out["servers"]["mlserver"] = {c: load(f"http://127.0.0.1:{port}", "nano", x, c, n, binary=False)
                                          for c, n in levels}
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    for name, results in out["servers"].items():
        for c, r in results.items():
            print(f"{name:28} c={c:>2}: {r['requests_per_s']:7.1f} req/s  p50 {r['p50_ms']:6.2f} ms  "
                  f"p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}")
    print(f"saved {save('serving_libraries', out)}")


if __name__ == "__main__":
    main()
