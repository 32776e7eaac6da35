"""``nfnet-hub triton`` model repositories (checked against Triton's own ModelConfig schema, which ships
with tritonclient) and the KServe deployment files (checked against the CLI they call)."""
from __future__ import annotations

import json
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
    repo = tmp_path / "my models"  # the commands printed and written for it must survive a copy into a shell
    assert main(["triton", str(nano_bundle), "--out", str(repo), "--name", "nano", "--precision", precision,
                 "--max-batch-size", "16", "--max-delay-ms", "2.5", "--instances", "3", "--threads", "2"]) == 0
    command = capsys.readouterr().out.split("serve it with: ")[1]
    assert shlex.split(command) == ["tritonserver", f"--model-repository={repo}"]
    readme = (repo / "nano" / "README.md").read_text()
    assert shlex.split(readme.split("```\n")[1]) == ["tritonserver", f"--model-repository={repo}"]
    docker = shlex.split(readme.split("`docker run ")[1].split("`")[0])
    assert docker[docker.index("-v") + 1] == f"{repo}:/models"
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
    assert config.parameters["intra_op_thread_count"].string_value == "2"  # the ONNX Runtime backend's key
    assert config.output[0].label_filename == "labels.txt"
    assert (folder / "labels.txt").read_text().split() == [str(d) for d in range(10)]
    readme = (folder / "README.md").read_text()
    assert "tritonserver --model-repository" in readme
    assert "as the model was trained (32x32 px, squash crop 1, bicubic, mean (0.27, 0.27, 0.27)" in readme


def test_gpu_tensorrt_and_a_second_model_beside_the_first(nano_bundle, tmp_path):
    repo = tmp_path / "repo"
    main(["triton", f"local-dir:{nano_bundle}", "--out", str(repo), "--name", "a"])  # as timm names a folder
    main(["triton", str(nano_bundle), "--out", str(repo), "--name", "b", "--gpu", "--accelerator", "tensorrt"])
    assert _config(repo / "a").instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert "intra_op_thread_count" not in _config(repo / "a").parameters  # the backend's default
    b = _config(repo / "b")
    assert b.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    trt = b.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP32"


def test_refusals(nano_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "mine").mkdir(parents=True)
    (repo / "mine" / "notes.txt").write_text("keep me")
    (repo / "theirs" / "1").mkdir(parents=True)  # a model of the user's, laid out as Triton wants, as ours are
    (repo / "theirs" / "config.pbtxt").write_text('name: "theirs"\nbackend: "onnxruntime"\n')
    (repo / "theirs" / "1" / "model.onnx").write_bytes(b"their model")
    cases = [
        (["--name", "mine"], "exists: pass --overwrite"),
        (["--name", "mine", "--overwrite"], "not a model folder this command wrote"),
        (["--name", "theirs", "--overwrite"], "refusing to replace"),
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
    assert (repo / "theirs" / "1" / "model.onnx").read_bytes() == b"their model"
    assert main(["triton", str(tmp_path / "missing"), "--out", str(repo)]) == 2
    assert "no bundle folder or ONNX file at" in capsys.readouterr().err  # a path: never a Hub download
    for name in ("../beside", 'a"b', "sub/model"):  # out of the repository, or a config.pbtxt that does not parse
        assert main(["triton", str(nano_bundle), "--out", str(repo), "--name", name]) == 2
        assert f"{name!r} cannot be a model name in a URL (letters, digits, '_', '.', '-'): choose another --name" \
            in capsys.readouterr().err
    spaced = shutil.copytree(nano_bundle, tmp_path / "my bundle")
    assert main(["triton", str(spaced), "--out", str(repo)]) == 2 and "give --name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "my bundle", "repo"]
    assert sorted(p.name for p in repo.iterdir()) == ["mine", "theirs"]
    main(["triton", str(nano_bundle), "--out", str(repo), "--name", "again"])
    assert main(["triton", str(nano_bundle), "--out", str(repo), "--name", "again", "--overwrite",
                 "--instances", "2"]) == 0
    assert _config(repo / "again").instance_group[0].count == 2


def test_an_onnx_file_alone_takes_its_labels_from_its_metadata(nano_bundle, tmp_path, capsys):
    """``export``'s ONNX file, without the bundle around it (as ``serve`` and ``predict`` take it)."""
    model = onnx.load(str(nano_bundle / "model.onnx"))
    meta = {p.key: p for p in model.metadata_props}
    words = [f"digit {d}" for d in range(10)]
    meta["nfnet_hub.labels"].value = json.dumps(words)  # names of its own, unlike the bundle's config.json
    (tmp_path / "out").mkdir()
    onnx.save(model, str(tmp_path / "out" / "digits.onnx"))
    repo = tmp_path / "repo"
    assert main(["triton", str(tmp_path / "out" / "digits.onnx"), "--out", str(repo)]) == 0
    assert (repo / "digits" / "labels.txt").read_text().splitlines() == words  # named after the file
    assert (repo / "digits" / "1" / "model.onnx").read_bytes() == (tmp_path / "out" / "digits.onnx").read_bytes()
    assert _config(repo / "digits").input[0].name == "pixel_values"
    assert main(["triton", str(tmp_path / "out" / "digits.onnx"), "--out", str(repo), "--name", "d8",
                 "--precision", "int8"]) == 2
    assert "is one file" in capsys.readouterr().err
    meta["nfnet_hub.labels"].value = "null"  # weights that name no classes: named by index, as serve names them
    onnx.save(model, str(tmp_path / "out" / "unnamed.onnx"))
    assert main(["triton", str(tmp_path / "out" / "unnamed.onnx"), "--out", str(repo)]) == 0
    assert (repo / "unnamed" / "labels.txt").read_text().splitlines() == [str(i) for i in range(10)]
    del model.metadata_props[:]  # an ONNX file from elsewhere: nothing says what its outputs are
    onnx.save(model, str(tmp_path / "out" / "bare.onnx"))
    assert main(["triton", str(tmp_path / "out" / "bare.onnx"), "--out", str(repo)]) == 2
    assert "carries no preprocessing metadata" in capsys.readouterr().err and not (repo / "bare").exists()


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
