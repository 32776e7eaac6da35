"""Starts ``nfnet-hub serve`` on loopback for a test, with torch made unimportable, and stops it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

# The server runs as ``nfnet-hub serve`` would, except that importing torch raises: the serving path must not.
NO_TORCH = "import sys; sys.modules['torch'] = None; from nfnet_hub.cli import main; sys.exit(main())"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``with Server(source, *options) as url:`` a ready server; SIGTERM on leaving (bounded waits)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, ready_timeout: float = 90,
                 threads: bool = True, poll_s: float = 0.2, cpus: set[int] | None = None):
        """``threads``: one ONNX Runtime thread (tests share the machine); False: the server's default. ``cpus``: the
        CPUs the server may run on (its affinity, as a container's cpuset sets it)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-c", NO_TORCH, "serve", *args, "--port", str(self.port)]
        self.env = {**os.environ, **(env or {})}
        if threads:
            self.command += ["--threads", "1"]
            self.env.setdefault("OMP_NUM_THREADS", "1")
        self.ready_timeout, self.poll_s, self.cpus = ready_timeout, poll_s, cpus
        self.output = ""

    def __enter__(self) -> str:
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     preexec_fn=(lambda: os.sched_setaffinity(0, self.cpus)) if self.cpus else None,
                                     text=True)
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                time.sleep(self.poll_s)
        self.stop()
        raise RuntimeError(f"the server was not ready in {self.ready_timeout} s:\n{self.output}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.output, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.output, _ = self.proc.communicate()
        return self.proc.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


def infer(url: str, model: str, pixels=None, *, images: tuple[bytes, ...] = ()) -> tuple[int, dict]:
    """One JSON inference request to ``model``: ``pixels`` (an NCHW float32 array) as 'pixel_values', or encoded
    ``images`` as 'image' (base64 strings); the HTTP status and the answer."""
    import base64
    import json

    if pixels is not None:
        tensor = {"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32",
                  "data": pixels.ravel().tolist()}
    else:
        tensor = {"name": "image", "shape": [len(images)], "datatype": "BYTES",
                  "data": [base64.b64encode(i).decode() for i in images]}
    request = urllib.request.Request(f"{url}/v2/models/{model}/infer", json.dumps({"inputs": [tensor]}).encode(),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
