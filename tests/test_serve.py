"""``nfnet-hub serve`` on loopback, talked to with tritonclient (a client nobody here wrote).

One server (the suite's trained nano, torch unimportable in its process) answers every test of the
module; the drain test starts its own. Expected answers come from ``OnnxClassifier`` in this process.
"""
from __future__ import annotations

import base64
import functools
import gzip
import http.client
import io
import json
import os
import queue
import re
import threading
import time

import numpy as np
import pytest
from PIL import Image
from serving import Server, free_port, infer

from nfnet_hub.preprocess import list_images
from nfnet_hub.runtime import OnnxClassifier

tritonclient_http = pytest.importorskip("tritonclient.http")
MAX_BATCH = 8
MAX_PIXELS = 20_000_000


@pytest.fixture(scope="module")
def servers(nano_bundle):
    """The HTTP URL and the gRPC address of one server."""
    # A 200 ms window makes concurrent requests meet in one batch even on a loaded 2-core machine.
    grpc_port = free_port()
    with Server(str(nano_bundle), "--name", "nano", "--max-batch-size", str(MAX_BATCH), "--max-delay-ms", "200",
                "--max-request-mb", "1", "--max-image-pixels", str(MAX_PIXELS), "--workers", "2", "--grpc-port",
                str(grpc_port)) as url:
        yield url, f"127.0.0.1:{grpc_port}"


@pytest.fixture(scope="module")
def server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def client(server):
    c = tritonclient_http.InferenceServerClient(server.removeprefix("http://"), concurrency=16)
    yield c
    c.close()


@pytest.fixture(scope="module")
def clf(nano_bundle):
    return OnnxClassifier.from_pretrained(nano_bundle)


@pytest.fixture(scope="module")
def digit_files(digits_folders):
    return list_images(digits_folders / "validation")[:40]


def _encoded(path, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, fmt)
    return buf.getvalue()


def _pixels_input(x: np.ndarray, binary: bool = True):
    i = tritonclient_http.InferInput("pixel_values", list(x.shape), "FP32")
    i.set_data_from_numpy(x, binary_data=binary)
    return i


def _post(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return r.status, json.loads(data) if data else {}
    finally:
        conn.close()


def _metrics(url: str) -> str:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return text


def test_health_and_metadata(client, clf):
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("nano")
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata("nano")
    h, w = clf.preprocess.input_size
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "pixel_values": ("FP32", [-1, 3, h, w]), "image": ("BYTES", [-1])}
    assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, len(clf.labels)]}
    assert "name" in client.get_server_metadata()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_pixel_values_give_the_classifiers_logits(client, clf, binary):
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = tritonclient_http.InferRequestedOutput("logits", binary_data=binary)
    result = client.infer("nano", [_pixels_input(x, binary)], outputs=[out])
    np.testing.assert_allclose(result.as_numpy("logits"), clf.logits(x), rtol=0, atol=1e-5)
    assert (result.get_response()["outputs"][0].get("parameters") or {}).get("binary_data_size") == (
        3 * len(clf.labels) * 4 if binary else None)


def test_version_1_is_the_model_as_triton_numbers_it_and_other_versions_are_refused(servers, client, clf):
    """A client written for the Triton repository `nfnet-hub triton` makes (the model in 1/) may name version 1:
    KServe's server refuses every version (501); this one answers version 1 and refuses others with 404."""
    from tritonclient.utils import InferenceServerException

    grpc_client = pytest.importorskip("tritonclient.grpc")
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for version in ("1", ""):  # every answer names the version that gave it, as Triton's do
        result = client.infer("nano", [_pixels_input(x)], model_version=version)
        np.testing.assert_allclose(result.as_numpy("logits"), clf.logits(x), rtol=0, atol=1e-5)
        assert result.get_response()["model_version"] == "1"
    assert client.is_model_ready("nano", "1") and client.get_model_metadata("nano", "1")["name"] == "nano"
    assert client.get_model_metadata("nano")["versions"] == ["1"]  # the protocol's list of versions one may name
    g = grpc_client.InferenceServerClient(servers[1])
    pixels = grpc_client.InferInput("pixel_values", [2, 3, 32, 32], "FP32").set_data_from_numpy(x)
    result = g.infer("nano", [pixels], model_version="1")
    np.testing.assert_allclose(result.as_numpy("logits"), clf.logits(x), atol=1e-5)
    assert result.get_response().model_version == g.infer("nano", [pixels]).get_response().model_version == "1"
    for refused, status in ((lambda: client.infer("nano", [_pixels_input(x)], model_version="2"), "404"),
                            (lambda: g.infer("nano", [pixels], model_version="2"), "NOT_FOUND")):
        with pytest.raises(InferenceServerException, match="model nano is served as version 1 only, not 2") as e:
            refused()
        assert status in str(e.value.status())
    g.close()
    assert not client.is_model_ready("nano", "2") and not client.is_model_ready("no-such-model", "1")


def test_tritonclients_model_config_and_repository_index_are_answered(server, client):
    """tritonclient's get_model_config, get_model_repository_index and get_inference_statistics failed with "an
    exception occurred in the client while decoding the response" (FastAPI's 404 {"detail": ...}); the config is the
    one `nfnet-hub triton` would write for the model, and every route that does not exist answers in the protocol's
    error form."""
    from google.protobuf import json_format
    from tritonclient.utils import InferenceServerException

    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    config, metadata = client.get_model_config("nano"), client.get_model_metadata("nano")
    assert (config["name"], config["platform"], config["max_batch_size"]) == ("nano", "onnxruntime_onnx", MAX_BATCH)
    assert config["dynamic_batching"] == {"max_queue_delay_microseconds": 200_000}
    for tensors, described in ((config["input"], metadata["inputs"]), (config["output"], metadata["outputs"])):
        assert [(t["name"], t["data_type"], t["dims"], t.get("reshape")) for t in tensors] == [
            (t["name"], "TYPE_STRING" if t["datatype"] == "BYTES" else f"TYPE_{t['datatype']}", t["shape"][1:] or [1],
             None if t["shape"][1:] else {"shape": []}) for t in described]
    assert config["input"][0]["dims"] == [3, 32, 32] and config["output"][0]["dims"] == [10]
    # Triton's own rules for a config (its ValidateIOShape, which cannot run here): every tensor has dims; a batch of
    # one element each (an image's bytes) is dims [1] reshaped to []. The served dims had been [] for `image`.
    assert config["input"][1] == {"name": "image", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []},
                                  "optional": True}
    parsed = json_format.ParseDict(config, model_config_pb2.ModelConfig())  # Triton's own schema, field by field
    assert all(len(t.dims) and all(d >= 1 or d == -1 for d in t.dims) for t in [*parsed.input, *parsed.output])
    assert client.get_model_config("nano", "1") == config
    for call, words in ((lambda: client.get_model_config("nano", "2"), "served as version 1 only, not 2"),
                        (lambda: client.get_model_config("other"), "Model with name other does not exist"),
                        (lambda: client.get_inference_statistics("nano"), "Prometheus metrics, over HTTP at /metrics")):
        with pytest.raises(InferenceServerException, match=words):
            call()
    assert client.get_model_repository_index() == [{"name": "nano", "version": "1", "state": "READY"}]
    conn = http.client.HTTPConnection(server.removeprefix("http://"), timeout=30)
    for method, path, status, error in (("GET", "/v2/nope", 404, "no such route: GET /v2/nope"),
                                        ("GET", "/v2/models/nano/infer", 405, "GET is not allowed on "
                                                                             "/v2/models/nano/infer")):
        conn.request(method, path)
        response = conn.getresponse()
        assert (response.status, json.loads(response.read())) == (status, {"error": error})
    conn.close()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_image_bytes_are_preprocessed_like_the_runtime_and_give_top_k(client, clf, digit_files, fmt):
    files = [_encoded(p, fmt) for p in digit_files[:3]]
    images = [Image.open(io.BytesIO(f)) for f in files]
    i = tritonclient_http.InferInput("image", [len(files)], "BYTES")
    i.set_data_from_numpy(np.array(files, dtype=np.object_))
    result = client.infer("nano", [i], parameters={"top_k": 3})
    np.testing.assert_allclose(result.as_numpy("logits"), clf.logits(clf.preprocess.batch(images)), atol=1e-5)
    expected = clf.predict(images, top_k=3)
    labels, scores = result.as_numpy("labels"), result.as_numpy("scores")
    assert labels.shape == scores.shape == (3, 3)
    assert [[b.decode() for b in row] for row in labels] == [[p.label for p in row] for row in expected]
    np.testing.assert_allclose(scores, [[p.probability for p in row] for row in expected], atol=1e-5)


def test_image_bytes_in_json_are_base64(server, clf, digit_files):
    data = _encoded(digit_files[0], "PNG")
    body = {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(data).decode()]}],
            "parameters": {"top_k": 1}}
    status, answer = _post(server, "/v2/models/nano/infer", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
    assert status == 200, answer
    outputs = {o["name"]: o for o in answer["outputs"]}
    assert outputs["labels"]["data"] == [clf.predict([Image.open(io.BytesIO(data))], top_k=1)[0][0].label]


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(server, client, clf):
    before = _batch_counts(_metrics(server))
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((1 + k % 2, 3, 32, 32)).astype(np.float32) for k in range(16)]
    pending = [client.async_infer("nano", [_pixels_input(x)], request_id=str(k)) for k, x in enumerate(xs)]
    for k, (x, p) in enumerate(zip(xs, pending)):
        result = p.get_result(timeout=120)
        assert result.get_response()["id"] == str(k)
        np.testing.assert_allclose(result.as_numpy("logits"), clf.logits(x), atol=1e-5)
    after = _batch_counts(_metrics(server))
    batches, rows, of_one = (after[k] - before[k] for k in ("count", "sum", "le1"))
    assert rows == sum(len(x) for x in xs)
    assert batches - of_one >= 1 and batches < len(xs), f"{batches} batches for {len(xs)} requests"


def _batch_counts(metrics: str) -> dict[str, float]:
    def value(pattern: str) -> float:
        m = re.search(pattern + r' ([0-9.e+]+)', metrics)
        return float(m.group(1)) if m else 0.0
    return {"count": value(r'nfnet_hub_batch_size_count\{model="nano"\}'),
            "sum": value(r'nfnet_hub_batch_size_sum\{model="nano"\}'),
            "le1": value(r'nfnet_hub_batch_size_bucket\{le="1\.0",model="nano"\}')}


def test_metrics_cover_requests_latency_queue_compute_and_failures(server, client):
    client.infer("nano", [_pixels_input(np.zeros((1, 3, 32, 32), np.float32))])
    _post(server, "/v2/models/nano/infer", b"{not json")
    before = _failures(_metrics(server))
    _post(server, "/v2/models/nano/infer", b" " * (2 << 20))  # refused by its Content-Length alone
    text = _metrics(server)
    assert _failures(text) == before + 1
    for name in ("nfnet_hub_requests_total", "nfnet_hub_request_seconds_bucket", "nfnet_hub_queue_seconds_bucket",
                 "nfnet_hub_compute_seconds_bucket", "nfnet_hub_batch_size_bucket"):
        assert re.search(name + r'\{[^}]*model="nano"', text), name
    assert re.search(r'nfnet_hub_request_failures_total\{code="400",model="nano"\} [1-9]', text)


def _triton_classes(strings: np.ndarray, logits: np.ndarray, labels: list[str], count: int) -> None:
    """Triton's classification answer, "VALUE:INDEX:LABEL" for the ``count`` largest logits of each row."""
    assert strings.shape == (len(logits), count) and strings.dtype == np.object_
    for row, answer in zip(logits, strings):
        parts = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in answer]  # JSON gives str
        assert [int(i) for _, i, _ in parts] == list(np.argsort(-row, kind="stable")[:count])
        assert [label for _, _, label in parts] == [labels[int(i)] for _, i, _ in parts]
        assert all(re.fullmatch(r"-?\d+\.\d{6}", value) for value, _, _ in parts)  # std::to_string's %f
        np.testing.assert_allclose([float(v) for v, _, _ in parts], row[[int(i) for _, i, _ in parts]], atol=1e-5)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_class_count_is_answered_as_tritons_classification_extension(client, clf, binary):
    """tritonclient's class_count, which Triton answers from the labels.txt that ``nfnet-hub triton`` writes: one
    client for both servers."""
    x = np.random.default_rng(5).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = tritonclient_http.InferRequestedOutput("logits", binary_data=binary, class_count=4)
    result = client.infer("nano", [_pixels_input(x, binary)], outputs=[out])
    _triton_classes(result.as_numpy("logits"), clf.logits(x), clf.labels, 4)
    out = tritonclient_http.InferRequestedOutput("logits", binary_data=binary, class_count=99)  # Triton caps it
    _triton_classes(client.infer("nano", [_pixels_input(x, binary)], outputs=[out]).as_numpy("logits"),
                    clf.logits(x), clf.labels, len(clf.labels))


def _failures(metrics: str) -> float:
    m = re.search(r'nfnet_hub_request_failures_total\{code="400",model="nano"\} ([0-9.e+]+)', metrics)
    return float(m.group(1)) if m else 0.0


def _binary(header: dict, tail: bytes) -> tuple[bytes, dict[str, str]]:
    head = json.dumps(header).encode()
    return head + tail, {"Inference-Header-Content-Length": str(len(head)),
                         "Content-Type": "application/octet-stream"}


def _request(name="pixel_values", shape=(1, 3, 32, 32), datatype="FP32", data=None, **extra) -> bytes:
    data = data if data is not None else [0.0] * int(np.prod(shape))
    return json.dumps({"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}],
                       **extra}).encode()


def _bad_requests():
    x = np.zeros((1, 3, 32, 32), np.float32).tobytes()
    nan = np.zeros((1, 3, 32, 32), np.float32)
    nan[0, 0, 0, :2] = np.nan, np.inf
    nan = nan.tobytes()  # binary data: JSON has no NaN
    spec = {"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32"}
    return {
        "wrong shape": ("nano", _request(shape=(1, 3, 16, 16)), {}, "shape"),
        "wrong dtype": ("nano", _request(datatype="INT32", data=[0] * 3072), {}, "FP32"),
        "wrong input name": ("nano", _request(name="pixels"), {}, "pixel_values"),
        "two inputs": ("nano", json.dumps({"inputs": [json.loads(_request())["inputs"][0]] * 2}).encode(), {},
                       "one input"),
        "unknown model": ("no-such-model", _request(), {}, "no-such-model"),
        "malformed JSON": ("nano", b'{"inputs": [', {}, "not an inference request"),
        "no inputs field": ("nano", b'{"outputs": []}', {}, "inputs"),
        "data shorter than shape": ("nano", _request(data=[0.0] * 10), {}, "shape"),
        "NaN pixels": ("nano", *_binary({"inputs": [{**spec, "parameters": {"binary_data_size": len(nan)}}],
                                          "parameters": {"top_k": 2}}, nan),
                       "input 'pixel_values' holds 2 NaN or infinite values"),
        "non-image bytes": ("nano", _request(name="image", shape=(1,), datatype="BYTES",
                                              data=[base64.b64encode(b"not an image").decode()]), {},
                            "input 'image' element 0 is not a readable image"),
        "image above --max-image-pixels": ("nano", _request(name="image", shape=(2,), datatype="BYTES", data=[
            base64.b64encode(_png(4000, 5000)).decode(), base64.b64encode(_png(5000, 4001)).decode()]), {},
            "input 'image' element 1 is 5000x4001 (20,005,000 pixels), more than the 20,000,000 pixels an image may"),
        "decompression bomb": ("nano", _request(name="image", shape=(1,), datatype="BYTES",
                                                data=[base64.b64encode(_png(20_000, 20_000)).decode()]), {},
                               "is 20000x20000 (400,000,000 pixels), more than"),
        "BYTES not base64": ("nano", _request(name="image", shape=(1,), datatype="BYTES", data=["%%%"]), {},
                             "image"),
        "truncated binary data": ("nano", *_binary({"inputs": [{**spec, "parameters": {"binary_data_size": len(x)}}]},
                                                   x[:100]), "truncated"),
        "binary header past the body": ("nano", b'{"inputs": []}', {"Inference-Header-Content-Length": "999"},
                                        "length"),
        "binary header not a number": ("nano", *_binary({"inputs": []}, b"")[:1],
                                       {"Inference-Header-Content-Length": "x", "Content-Type": "application/json"},
                                       "length"),
        "batch above the limit": ("nano", _request(shape=(MAX_BATCH + 1, 3, 32, 32)), {}, "--max-batch-size"),
        "negative dim": ("nano", _request(shape=(-1, 3, 32, 32), data=[]), {}, "positive"),
        "zero dim": ("nano", _request(shape=(0, 3, 32, 32), data=[]), {}, "positive"),
        "top_k too large": ("nano", _request(parameters={"top_k": 11}), {}, "top_k"),
        "top_k not a number": ("nano", _request(parameters={"top_k": "5"}), {}, "top_k"),
        "unknown output": ("nano", _request(outputs=[{"name": "probs"}]), {}, "probs"),
        "classification of scores": ("nano", _request(parameters={"top_k": 2}, outputs=[
            {"name": "scores", "parameters": {"classification": 2}}]), {}, "'scores' takes no classification"),
        "classification not a count": ("nano", _request(outputs=[
            {"name": "logits", "parameters": {"classification": "2"}}]), {}, "classification must be a count"),
        "oversized body": ("nano", b" " * (2 << 20) + _request(), {}, "--max-request-mb"),
        "gzip body above the limit once decompressed": (
            "nano", gzip.compress(b" " * (2 << 20) + _request()), {"Content-Encoding": "gzip"}, "--max-request-mb"),
        "truncated gzip body": ("nano", gzip.compress(_request())[:-30], {"Content-Encoding": "gzip"}, "truncated"),
        "body not as its encoding says": ("nano", _request(), {"Content-Encoding": "deflate"}, "not deflate data"),
        "unknown encoding": ("nano", _request(), {"Content-Encoding": "br"}, "takes gzip and deflate"),
    }


@functools.cache
def _png(width: int, height: int, mode: str = "1") -> bytes:
    """A PNG of one colour: tens of kB for tens of Mpixels (a decompression bomb at 20000x20000)."""
    png = io.BytesIO()
    Image.new(mode, (width, height), "white").save(png, "PNG")
    return png.getvalue()


@pytest.mark.parametrize("case", list(_bad_requests()))
def test_bad_requests_get_the_protocols_error_and_the_server_keeps_serving(server, client, clf, case):
    model, body, headers, words = _bad_requests()[case]
    status, answer = _post(server, f"/v2/models/{model}/infer", body, headers)
    assert status == (404 if case == "unknown model" else 400), (status, answer)
    assert set(answer) == {"error"} and words in answer["error"], answer
    x = np.ones((1, 3, 32, 32), np.float32)
    np.testing.assert_allclose(client.infer("nano", [_pixels_input(x)]).as_numpy("logits"), clf.logits(x), atol=1e-5)


def test_grpc_gives_the_same_answers_and_the_same_errors(servers, clf, digit_files):
    grpc_client = pytest.importorskip("tritonclient.grpc")
    from google.protobuf import json_format
    from tritonclient.utils import InferenceServerException

    client = grpc_client.InferenceServerClient(servers[1])
    assert client.is_server_ready() and client.is_model_ready("nano") and client.is_model_ready("nano", "1")
    assert not client.is_model_ready("nano", "2")  # as over HTTP; KServe's servicer said ready for any version
    meta = client.get_model_metadata("nano", as_json=True)
    assert meta["versions"] == ["1"] == client.get_model_metadata("nano", "1", as_json=True)["versions"]
    with pytest.raises(InferenceServerException, match="model nano is served as version 1 only, not 2"):
        client.get_model_metadata("nano", "2")
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [("pixel_values", "FP32"), ("image", "BYTES")]
    x = np.random.default_rng(2).standard_normal((2, 3, 32, 32)).astype(np.float32)
    pixels = grpc_client.InferInput("pixel_values", [2, 3, 32, 32], "FP32").set_data_from_numpy(x)
    np.testing.assert_allclose(client.infer("nano", [pixels]).as_numpy("logits"), clf.logits(x), atol=1e-5)
    files = [_encoded(p, "PNG") for p in digit_files[:2]]
    image = grpc_client.InferInput("image", [2], "BYTES").set_data_from_numpy(np.array(files, dtype=np.object_))
    result = client.infer("nano", [image], parameters={"top_k": 2})
    expected = clf.predict([Image.open(io.BytesIO(f)) for f in files], top_k=2)
    assert [[b.decode() for b in row] for row in result.as_numpy("labels")] == [[p.label for p in r] for r in expected]
    classes = client.infer("nano", [pixels], outputs=[grpc_client.InferRequestedOutput("logits", class_count=3)])
    _triton_classes(classes.as_numpy("logits"), clf.logits(x), clf.labels, 3)
    bad = [("nano", grpc_client.InferInput("pixels", [1, 3, 32, 32], "FP32").set_data_from_numpy(x[:1]),
            "INVALID_ARGUMENT"),
           ("no-such-model", pixels, "NOT_FOUND"),
           ("nano", grpc_client.InferInput("pixel_values", [MAX_BATCH + 1, 3, 32, 32], "FP32").set_data_from_numpy(
               np.zeros((MAX_BATCH + 1, 3, 32, 32), np.float32)), "INVALID_ARGUMENT")]
    for model, tensor, status in bad:
        with pytest.raises(InferenceServerException) as e:
            client.infer(model, [tensor])
        assert status in str(e.value.status()), e.value
    big = np.zeros((MAX_BATCH, 3, 128, 128), np.float32)  # 1.5 MiB: above --max-request-mb 1
    with pytest.raises(InferenceServerException) as e:
        client.infer("nano", [grpc_client.InferInput("pixel_values", list(big.shape), "FP32").set_data_from_numpy(big)])
    assert "RESOURCE_EXHAUSTED" in str(e.value.status())
    np.testing.assert_allclose(client.infer("nano", [pixels]).as_numpy("logits"), clf.logits(x), atol=1e-5)
    # Triton's extensions (had been "Method not found!"): the configuration HTTP serves, in Triton's own message
    over_http = tritonclient_http.InferenceServerClient(servers[0].removeprefix("http://")).get_model_config("nano")
    config = client.get_model_config("nano", "1").config
    assert config == json_format.ParseDict(over_http, grpc_client.model_config_pb2.ModelConfig())
    assert (config.name, config.max_batch_size, list(config.input[0].dims)) == ("nano", MAX_BATCH, [3, 32, 32])
    index = client.get_model_repository_index().models
    assert [(m.name, m.version, m.state) for m in index] == [("nano", "1", "READY")]
    for call, status, words in ((lambda: client.get_model_config("nano", "2"), "NOT_FOUND", "version 1 only, not 2"),
                                (lambda: client.get_model_config("other"), "NOT_FOUND", "name other does not exist"),
                                (lambda: client.get_inference_statistics("nano"), "UNIMPLEMENTED",
                                 "Prometheus metrics, over HTTP at /metrics")):
        with pytest.raises(InferenceServerException, match=words) as e:
            call()
        assert status in str(e.value.status())
    client.close()
    assert re.search(r'nfnet_hub_request_failures_total\{code="INVALID_ARGUMENT",model="nano"\} [1-9]',
                     _metrics(servers[0]))


def test_no_client_can_unload_a_served_model(nano_bundle, clf):
    """KServe's repository extension let any client unload a model for good (loading it back failed); its v1
    :explain logged a traceback. Each is refused with one line in the log."""
    grpc_client = pytest.importorskip("tritonclient.grpc")
    from tritonclient.utils import InferenceServerException

    grpc_port = free_port()
    server = Server(str(nano_bundle), "--name", "nano", "--grpc-port", str(grpc_port))
    url = server.__enter__()
    try:
        client = tritonclient_http.InferenceServerClient(url.removeprefix("http://"))
        g = grpc_client.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        for call, status in [(lambda: client.unload_model("nano"), "501"), (lambda: client.load_model("nano"), "501"),
                             (lambda: g.unload_model("nano"), "UNIMPLEMENTED"),
                             (lambda: g.load_model("nano"), "UNIMPLEMENTED")]:
            with pytest.raises(InferenceServerException, match="loads its models when it starts and keeps them") as e:
                call()
            assert status in str(e.value.status())
        assert _post(url, "/v1/models/nano:explain", b'{"instances": [[1]]}')[0] == 501
        one = grpc_client.InferInput("pixel_values", [1, 3, 32, 32], "FP32").set_data_from_numpy(
            np.ones((1, 3, 32, 32), np.float32))
        refused = [(lambda: g.get_model_metadata("nano", "2"), "version 1 only"),
                   (lambda: g.get_model_config("nano", "2"), "version 1 only"),
                   (lambda: g.get_model_config("other"), "does not exist"),
                   (lambda: g.infer("nano", [one], model_version="2"), "version 1 only"),
                   (lambda: g.get_inference_statistics("nano"), "Prometheus metrics"),
                   (g.get_system_shared_memory_status, "shared memory .* is not served: send the tensors"),
                   (lambda: g.register_cuda_shared_memory("r", b"", 0, 8), "shared memory .* is not served"),
                   (g.get_trace_settings, "trace settings .* are not served"),
                   (g.get_log_settings, "log settings .* are not served")]  # each had been "Method not found!"
        for call, words in refused:
            with pytest.raises(InferenceServerException, match=words):  # no "Internal server error" logged
                call()
        answers = queue.Queue()
        g.start_stream(lambda result, error: answers.put(error))
        assert "streaming inference (Triton's extension) is not served" in str(answers.get(timeout=30))
        g.stop_stream()
        assert client.is_model_ready("nano")
        x = np.ones((1, 3, 32, 32), np.float32)
        np.testing.assert_allclose(client.infer("nano", [_pixels_input(x)]).as_numpy("logits"), clf.logits(x),
                                   atol=1e-5)
        g.close()
        client.close()
    finally:
        server.stop()
    assert "Traceback" not in server.output, server.output
    assert len(re.findall(r"^model control, refused: .* cannot be (un)?loaded", server.output, re.M)) == 4
    assert re.search(r"^not served, refused: ", server.output, re.M)


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def test_large_images_are_decoded_one_at_a_time_per_cpu(nano_bundle, clf):
    """Photos of 16 Mpixels (64 MB each as Pillow holds them, 56 kB as PNGs) to a server on one CPU: eight in one
    request, then six requests at once. Its peak memory grows by one of them, then two, not eight or six: each is
    preprocessed before the next is decoded, and two threads per CPU decode."""
    from concurrent.futures import ThreadPoolExecutor

    big = _png(4000, 4000, "RGB")
    server = Server(str(nano_bundle), "--name", "nano", "--max-image-pixels", str(MAX_PIXELS),
                    cpus={min(os.sched_getaffinity(0))})
    with server as url:
        assert infer(url, "nano", images=(_png(64, 64, "RGB"),))[0] == 200  # allocations of a first request
        before = _peak_rss_mb(server.proc.pid)
        status, answer = infer(url, "nano", images=(big,) * MAX_BATCH)
        one_request = _peak_rss_mb(server.proc.pid) - before
        with ThreadPoolExecutor(6) as pool:
            statuses = [s for s, _ in pool.map(lambda _: infer(url, "nano", images=(big,)), range(6))]
        concurrent = _peak_rss_mb(server.proc.pid) - before
    assert status == 200 and statuses == [200] * 6, (answer, statuses)
    expected = clf.logits(clf.preprocess.batch([Image.open(io.BytesIO(big))] * MAX_BATCH))
    np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], expected.shape), expected, atol=1e-5)
    assert one_request < 3 * 64, f"peak memory grew by {one_request:.0f} MB for a request of {MAX_BATCH} 64 MB images"
    assert concurrent < 3 * 64, f"peak memory grew by {concurrent:.0f} MB for 6 requests of a 64 MB image at once"


def test_sigterm_answers_in_flight_requests_then_exits_0(nano_bundle, clf):
    server = Server(str(nano_bundle), "--name", "nano", "--max-delay-ms", "1500")
    url = server.__enter__()
    x = np.full((2, 3, 32, 32), 0.5, np.float32)
    answers = []
    sender = threading.Thread(target=lambda: answers.append(_post(url, "/v2/models/nano/infer", _request(
        shape=x.shape, data=x.ravel().tolist()))))
    sender.start()
    time.sleep(0.7)  # the request now waits in its 1.5 s batch window
    assert sender.is_alive()
    code = server.stop()
    sender.join(timeout=30)
    assert code == 0, server.output
    assert answers and answers[0][0] == 200, answers
    np.testing.assert_allclose(np.array(answers[0][1]["outputs"][0]["data"]).reshape(2, -1), clf.logits(x), atol=1e-5)
    assert "stopped" in server.output


def test_bundles_are_found_by_timms_names_too(nano_bundle):
    from nfnet_hub.serve.server import find_bundles

    assert find_bundles(f"local-dir:{nano_bundle}") == find_bundles(str(nano_bundle)) == {"bundle": str(nano_bundle)}
    assert find_bundles("hf-hub:me/nano") == find_bundles("me/nano") == {"nano": "me/nano"}
    int8 = nano_bundle / "model_int8.onnx"  # a file nfnet-hub exported: served under its name
    assert find_bundles(str(int8)) == {"model_int8": str(int8)}


def test_a_folder_of_bundles_serves_each_under_its_folder_name(nano_bundle, tmp_path, clf):
    import shutil

    for name in ("digits-a", "digits-b"):
        shutil.copytree(nano_bundle, tmp_path / "models" / name)
    (tmp_path / "models" / "notes").mkdir()  # not a bundle: skipped, and said
    (tmp_path / "models" / ".cache").mkdir()  # hidden: skipped quietly
    server = Server(str(tmp_path / "models"), "--precision", "int8")
    with server as url:
        c = tritonclient_http.InferenceServerClient(url.removeprefix("http://"))
        assert c.is_model_ready("digits-a") and c.is_model_ready("digits-b") and not c.is_model_ready("notes")
        x = np.zeros((1, 3, 32, 32), np.float32)
        int8 = OnnxClassifier.from_pretrained(nano_bundle, filename="model_int8.onnx")
        np.testing.assert_allclose(c.infer("digits-b", [_pixels_input(x)]).as_numpy("logits"), int8.logits(x),
                                   atol=1e-5)
        c.close()
    assert f"note: {tmp_path / 'models' / 'notes'} is not a bundle (config.json and model*.onnx): not served" \
        in server.output and ".cache" not in server.output


def test_threads_default_to_the_cpus_a_container_may_use(tmp_path, monkeypatch):
    """A pod limited to 4 CPUs of a 64-core node: ONNX Runtime alone would run a thread per node core. The cgroup
    files are stand-ins (tests cannot make a cgroup), in the kernel's formats."""
    from nfnet_hub.serve.server import cpu_budget, default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    v2.mkdir()
    assert (cpu_budget(v2), default_threads(1, v2), default_threads(2, v2)) == (64, None, 32)  # no limit
    (v2 / "cpu.max").write_text("max 100000\n")
    assert (cpu_budget(v2), default_threads(1, v2)) == (64, None)
    (v2 / "cpu.max").write_text("400000 100000\n")
    assert (cpu_budget(v2), default_threads(1, v2), default_threads(2, v2), default_threads(8, v2)) == (4, 4, 2, 1)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert (cpu_budget(v1), default_threads(1, v1)) == (2, 2)  # 2.5 CPUs of time: 2 busy threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})  # taskset -c 0
    assert (cpu_budget(v1), default_threads(1, v1)) == (1, 1)


def test_serve_refuses_what_it_cannot_serve_in_one_line(nano_bundle, tmp_path):
    import shutil
    import socket
    import subprocess
    import sys

    shutil.copytree(nano_bundle, tmp_path / "two" / "a")
    shutil.copytree(nano_bundle, tmp_path / "two" / "b")
    (tmp_path / "empty").mkdir()
    shutil.copytree(nano_bundle, tmp_path / "bad name!")
    shutil.copytree(nano_bundle, tmp_path / "odd" / "ok")
    shutil.copytree(nano_bundle, tmp_path / "odd" / "not ok")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        cases = [
            ([str(nano_bundle), "--port", port], "cannot listen on 127.0.0.1:" + port),
            ([str(nano_bundle), "--precision", "fp16"], "has no fp16 model (model_fp16.onnx); it has: fp32, int8"),
            ([str(tmp_path / "two"), "--name", "x"], "--name names one model"),
            ([str(tmp_path / "empty")], "neither a bundle folder"),
            ([str(tmp_path / "missing")], "no bundle folder or ONNX file at"),
            ([str(tmp_path / "bad name!")], "give --name"),
            ([str(tmp_path / "odd")], "'not ok' cannot be a model name in a URL (letters, digits, '_', '.', '-'): "
                                      "rename its folder"),
            ([str(nano_bundle), "--grpc-port", "8080", "--port", "8080"], "is the HTTP port"),
            ([str(nano_bundle), "--port", "99999"], "--port: must be a TCP port, 1 to 65535, got 99999"),
            ([str(nano_bundle), "--grpc-port", "0"], "--grpc-port: must be a TCP port, 1 to 65535, got 0"),
            ([str(nano_bundle / "config.json")], "give the folder that holds the bundle's files, or an .onnx file"),
            ([str(nano_bundle / "model.onnx"), "--precision", "int8"], "is one file: give it without --precision"),
            ([str(nano_bundle), "--workers", "0"], "--workers: must be a positive integer"),
            ([str(nano_bundle), "--max-delay-ms", "-1"], "--max-delay-ms: must be a finite number of at least 0"),
            ([str(nano_bundle), "--device", "cuda"], "has no CUDA provider"),
            ([str(nano_bundle), "--max-request-mb", "0"], "--max-request-mb: must be a finite number above 0, got 0"),
            ([str(nano_bundle), "--max-image-pixels", "1e6"], "--max-image-pixels: expected a positive integer"),
        ]
        for args, words in cases:  # as a user runs it: a process each, which must not listen
            run = subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "serve", *args, "--port", str(free_port())]
                                 if "--port" not in args else [sys.executable, "-m", "nfnet_hub.cli", "serve", *args],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 2 and words in run.stderr and run.stderr.count("\n") == 1, (args, run.stderr)
            assert "serving" not in run.stdout
    from nfnet_hub.errors import UsageError
    from nfnet_hub.serve.server import ServeOptions, serve

    with pytest.raises(UsageError, match=r"^port 70000 is not a TCP port \(1 to 65535\)$"):  # from Python too
        serve(str(nano_bundle), options=ServeOptions(port=70000))
    with pytest.raises(UsageError, match=r"^max_request_mb 0 would refuse every request"):
        serve(str(nano_bundle), options=ServeOptions(max_request_mb=0))
    with pytest.raises(UsageError, match=r"^max_image_pixels 1000000.0 must be a pixel count above 0"):
        serve(str(nano_bundle), options=ServeOptions(max_image_pixels=1e6))


def test_the_readme_client_snippet_runs_as_written(server, digit_files, tmp_path, monkeypatch):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.S)
                   if "tritonclient.http as httpclient" in block)
    (tmp_path / "digit.png").write_bytes(digit_files[0].read_bytes())
    monkeypatch.chdir(tmp_path)
    printed = io.StringIO()
    code = snippet.replace("127.0.0.1:8080", server.removeprefix("http://")).replace('"nano-digits"', '"nano"')
    exec(compile(code, "README.md", "exec"), {"print": lambda *a: printed.write(" ".join(map(str, a)))})
    assert printed.getvalue().endswith("(1, 10)")


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_compressed_requests_are_answered_as_triton_answers_them(client, clf, digit_files, algorithm, binary):
    """tritonclient's request_compression_algorithm, which Triton takes (the HTTP gzip and deflate encodings)."""
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    result = client.infer("nano", [_pixels_input(x, binary)], request_compression_algorithm=algorithm,
                          response_compression_algorithm=algorithm)
    np.testing.assert_allclose(result.as_numpy("logits"), clf.logits(x), rtol=0, atol=1e-5)
    png = _encoded(digit_files[0], "PNG")
    image = tritonclient_http.InferInput("image", [1], "BYTES")
    image.set_data_from_numpy(np.array([png], dtype=object))  # tritonclient sends bytes in binary only
    result = client.infer("nano", [image], request_compression_algorithm=algorithm)
    expected = clf.logits(clf.preprocess.batch([Image.open(io.BytesIO(png))]))
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("content_type", [None, "application/json", "text/plain"])
def test_the_binary_header_decides_the_body_format_whatever_the_content_type(server, clf, content_type):
    x = np.random.default_rng(3).standard_normal((1, 3, 32, 32)).astype(np.float32)
    spec = {"name": "pixel_values", "shape": [1, 3, 32, 32], "datatype": "FP32"}
    body, headers = _binary({"inputs": [{**spec, "parameters": {"binary_data_size": x.nbytes}}]}, x.tobytes())
    headers = {k: v for k, v in headers.items() if k != "Content-Type"} | (
        {"Content-Type": content_type} if content_type else {})
    status, answer = _post(server, "/v2/models/nano/infer", body, headers)
    assert status == 200, answer
    np.testing.assert_allclose(np.array(answer["outputs"][0]["data"]).reshape(1, -1), clf.logits(x), atol=1e-5)
    status, answer = _post(server, "/v2/models/nano/infer", _request(data=x.ravel().tolist()),
                           {"Content-Type": content_type} if content_type else {})
    assert status == 200, answer
