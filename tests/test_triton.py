"""``nfnet-hub triton`` model repositories (checked against Triton's own ModelConfig schema, which ships
with tritonclient) and the KServe deployment files (checked against the CLI they call)."""
from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import onnx
import pytest
import yaml
from google.protobuf import text_format

from nfnet_hub.cli import build_parser, main

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
_ONNX_TYPES = {onnx.TensorProto.FLOAT: model_config_pb2.TYPE_FP32}


def _config(folder: Path):
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_repository_matches_the_onnx_file_and_parses_as_triton_config(nano_bundle, tmp_path, precision, capsys):
    repo = tmp_path / "repo"
    assert main(["triton", str(nano_bundle), "--out", str(repo), "--name", "nano", "--precision", precision,
                 "--max-batch-size", "16", "--max-delay-ms", "2.5", "--instances", "3"]) == 0
    assert "tritonserver --model-repository=" in capsys.readouterr().out
    folder = repo / "nano"
    config = _config(folder)
    graph = onnx.load(str(folder / "1" / "model.onnx")).graph
    source = nano_bundle / {"fp32": "model.onnx", "int8": "model_int8.onnx"}[precision]
    assert (folder / "1" / "model.onnx").read_bytes() == source.read_bytes()
    assert config.name == "nano" and config.backend == "onnxruntime" and config.max_batch_size == 16
    for ours, theirs in ((config.input, graph.input), (config.output, graph.output)):
        assert [(t.name, t.data_type, list(t.dims)) for t in ours] == [
            (v.name, _ONNX_TYPES[v.type.tensor_type.elem_type], [d.dim_value for d in v.type.tensor_type.shape.dim[1:]])
            for v in theirs]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2500
    assert [(g.count, g.kind) for g in config.instance_group] == [(3, model_config_pb2.ModelInstanceGroup.KIND_CPU)]
    assert config.output[0].label_filename == "labels.txt"
    assert (folder / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    assert "tritonserver --model-repository" in (folder / "README.md").read_text()


def test_gpu_tensorrt_and_a_second_model_beside_the_first(nano_bundle, tmp_path):
    repo = tmp_path / "repo"
    main(["triton", f"local-dir:{nano_bundle}", "--out", str(repo), "--name", "a"])  # as timm names a folder
    main(["triton", str(nano_bundle), "--out", str(repo), "--name", "b", "--gpu", "--accelerator", "tensorrt"])
    assert _config(repo / "a").instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    b = _config(repo / "b")
    assert b.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    trt = b.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP32"


def test_refusals(nano_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "mine").mkdir(parents=True)
    (repo / "mine" / "notes.txt").write_text("keep me")
    cases = [
        (["--name", "mine"], "exists: pass --overwrite"),
        (["--name", "mine", "--overwrite"], "not a model folder this command wrote"),
        (["--accelerator", "tensorrt"], "needs --gpu"),
        (["--precision", "fp16"], "model_fp16.onnx"),
    ]
    for extra, words in cases:
        assert main(["triton", str(nano_bundle), "--out", str(repo), *extra]) == 2
        assert words in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(nano_bundle, broken)
    (broken / "model.onnx").write_bytes(b"garbage")
    assert main(["triton", str(broken), "--out", str(repo)]) == 2
    assert "is not an ONNX model" in capsys.readouterr().err and not (repo / "broken").exists()
    assert (repo / "mine" / "notes.txt").read_text() == "keep me"
    assert main(["triton", str(tmp_path / "missing"), "--out", str(repo)]) == 2
    assert main(["triton", "hf-hub:me/nano", "--out", str(repo)]) == 2
    assert "download the Hub repository first (hf download me/nano --local-dir DIR)" in capsys.readouterr().err
    main(["triton", str(nano_bundle), "--out", str(repo), "--name", "again"])
    assert main(["triton", str(nano_bundle), "--out", str(repo), "--name", "again", "--overwrite",
                 "--instances", "2"]) == 0
    assert _config(repo / "again").instance_group[0].count == 2


def test_dockerfile_and_kserve_manifests_call_the_cli_as_it_is():
    parser, _ = build_parser()
    custom = yaml.safe_load((DEPLOY / "kserve-nfnet-hub.yaml").read_text())
    assert custom["kind"] == "InferenceService"
    container = custom["spec"]["predictor"]["containers"][0]
    args = parser.parse_args(container["args"])
    assert (args.command, args.source, args.host) == ("serve", "/mnt/models", "0.0.0.0")
    assert container["ports"][0]["containerPort"] == args.port
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert any(e["name"] == "STORAGE_URI" for e in container["env"])

    docker = (DEPLOY / "Dockerfile").read_text()
    cmd = next(line for line in docker.splitlines() if line.startswith("CMD "))
    args = parser.parse_args(yaml.safe_load(cmd.removeprefix("CMD ")))
    assert (args.source, args.host, args.port) == ("/mnt/models", "0.0.0.0", 8080)
    assert f"EXPOSE {args.port}" in docker and "--no-deps" in docker and "'serve'" in docker

    text = (DEPLOY / "kserve-triton.yaml").read_text()
    triton = yaml.safe_load(text)["spec"]["predictor"]["model"]
    assert triton["modelFormat"]["name"] == "triton" and triton["protocolVersion"] == "v2"
    command = re.search(r"`nfnet-hub (triton [^`]+)`", text).group(1)  # the command its comment gives
    args = parser.parse_args(shlex.split(command))
    assert args.command == "triton" and args.gpu
