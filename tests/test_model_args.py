"""A model is rebuilt as it was built wherever its weights travel: the choices its tensors do not show (--gp, the WS
form, the activation of --model-kwargs, the authors' numerics of a converted checkpoint) go with them, into exports,
bundles, fine-tuning and resumed runs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import yaml
from conftest import randomise, rel_error
from test_deepmind import authors_params, write_npz
from timm.optim import create_optimizer_v2
from timm.utils import CheckpointSaver

from nfnet_hub.cli import main
from nfnet_hub.models.checkpoint import create_model
from nfnet_hub.models.variants import VARIANTS
from nfnet_hub.train import parse_args
from nfnet_hub.train.build import build

FIXTURE = Path(__file__).parent / "fixtures" / "timm-train-args.yaml"  # written by timm's own train.py
BUILT = {"ws": "deepmind", "act": "gelu_tanh", "global_pool": "max"}
QUICK = ["--dataset", "digits", "--model", "nfnet_hub_nano", "--workers", "0", "--no-progress", "--log-interval", "0",
         "--batch-size", "64", "--warmup-epochs", "0", "--epochs", "1"]


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_a_runs_pooling_and_numerics_go_into_its_export_and_bundle(tmp_path, capsys):
    """A checkpoint of timm's train.py run with --gp max --model-kwargs ws=deepmind act=gelu_tanh was exported with
    average pooling and our default numerics: a model other than the one trained, verified against itself."""
    options = {**yaml.safe_load(FIXTURE.read_text()), "img_size": 64, "num_classes": 10, "gp": "max",
               "model_kwargs": {"ws": "deepmind", "act": "gelu_tanh"}}
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=10, **BUILT))
    (tmp_path / "run").mkdir()
    saver = CheckpointSaver(model, create_optimizer_v2(model, "sgd", lr=0.1), args=argparse.Namespace(**options),
                            checkpoint_dir=str(tmp_path / "run"))
    saver.save_checkpoint(epoch=0, metric=50.0)
    ckpt = str(tmp_path / "run" / "model_best.pth.tar")
    x = torch.randn(2, 3, 64, 64)
    expected = logits(model, x)
    other = randomise(timm.create_model("nfnet_hub_nano", num_classes=10))
    other.load_state_dict(model.state_dict())
    assert rel_error(logits(other, x), expected) > 0.05  # what was exported before: the same tensors, another model

    assert main(["export", "nfnet_hub_nano", "--checkpoint", ckpt, "--out", str(tmp_path / "onnx")]) == 0
    assert "built with ws=deepmind, act=gelu_tanh, global_pool=max, as it records" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"pixel_values": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)

    bundle = tmp_path / "bundle"
    assert main(["bundle", "nfnet_hub_nano", "--checkpoint", ckpt, "--out", str(bundle)]) == 0
    assert json.loads((bundle / "config.json").read_text())["model_args"].items() >= BUILT.items()
    for rebuilt in (timm.create_model(f"local-dir:{bundle}", pretrained=True),  # timm, from config.json
                    create_model("nfnet_hub_nano", bundle / "model.safetensors")):  # ours, from its metadata
        torch.testing.assert_close(logits(rebuilt, x), expected, rtol=1e-5, atol=1e-6)
    # and what the caller asks for wins over the record
    assert create_model("nfnet_hub_nano", ckpt, global_pool="avg").head.global_pool.pool_type == "avg"


@pytest.fixture
def authors_nano(tmp_path):
    """The authors' checkpoint of the nano variant (as their Haiku code lays it out), and it converted."""
    v = VARIANTS["nano"]
    npz = tmp_path / "nano_haiku.npz"
    write_npz(authors_params(v.widths, v.depths, classes=10, group_size=v.group_size, stem=v.stem_channels[:3]), npz)
    assert main(["convert", "deepmind", str(npz), "--out", str(tmp_path / "nano.safetensors")]) == 0
    return npz, tmp_path / "nano.safetensors"


def test_fine_tuning_the_authors_weights_keeps_their_numerics(tmp_path, authors_nano, capsys):
    """--pretrained-path with a converted checkpoint built the model in our default numerics (timm's WS, exact GELU)
    under weights trained in the authors': a quietly different network. Now the run takes the recorded numerics,
    says so and records them, so that its export and a resume build the same model."""
    npz, converted = authors_nano
    as_converted = create_model("nfnet_hub_nano", converted)
    assert (as_converted.cfg.ws, as_converted.cfg.act) == ("deepmind", "gelu_tanh")
    # timm's own factory, given the file, builds what the file records
    direct = timm.create_model("nfnet_hub_nano", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(converted), num_classes=10))
    assert (direct.cfg.ws, direct.cfg.act) == ("deepmind", "gelu_tanh")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(direct, x), logits(as_converted, x))
    # which is how timm's own train.py builds it from --pretrained-path; its checkpoint records only the path, and
    # is exported as the model it trained
    options = {**yaml.safe_load(FIXTURE.read_text()), "pretrained_path": str(converted), "num_classes": 10}
    (tmp_path / "timm").mkdir()
    CheckpointSaver(randomise(direct), create_optimizer_v2(direct, "sgd", lr=0.1), args=argparse.Namespace(**options),
                    checkpoint_dir=str(tmp_path / "timm")).save_checkpoint(epoch=0, metric=50.0)
    exported = create_model("nfnet_hub_nano", tmp_path / "timm" / "model_best.pth.tar")
    assert (exported.cfg.ws, exported.cfg.act) == ("deepmind", "gelu_tanh")
    torch.testing.assert_close(logits(exported, x), logits(direct, x))

    out = tmp_path / "runs"
    run = build(parse_args([*QUICK, "--pretrained-path", str(converted), "--num-classes", "12", "--output", str(out)]))
    assert (run.model.cfg.ws, run.model.cfg.act) == ("deepmind", "gelu_tanh")
    assert f"built with ws=deepmind, act=gelu_tanh, as {converted} records" in capsys.readouterr().out
    assert run.args.model_kwargs == {"ws": "deepmind", "act": "gelu_tanh"}  # into args.yaml and every checkpoint
    # asked for otherwise, it is built otherwise
    run = build(parse_args([*QUICK, "--pretrained-path", str(converted), "--model-kwargs", "ws=timm", "--output",
                            str(out)]))
    assert (run.model.cfg.ws, run.model.cfg.act) == ("timm", "gelu_tanh")
    # the authors' .npz as a starting point: --initial-checkpoint maps it, --pretrained-path (timm's loader) cannot
    run = build(parse_args([*QUICK, "--initial-checkpoint", str(npz), "--output", str(out)]))
    assert (run.model.cfg.ws, run.model.cfg.act) == ("deepmind", "gelu_tanh")
    torch.testing.assert_close(logits(run.model, x), logits(as_converted, x))


def test_a_resume_builds_the_model_its_run_built(tmp_path, authors_nano, capsys):
    """A run started from the authors' weights, resumed without the options that chose their numerics, went on in
    others; refused now, naming them. Resuming with its --pretrained-path given again (a job script's --resume auto)
    is train.py's way and works: the resumed weights win."""
    _, converted = authors_nano
    out = ["--output", str(tmp_path), "--experiment", "ft"]
    assert main(["train", *QUICK, "--pretrained-path", str(converted), *out]) == 0
    last = str(tmp_path / "ft" / "last.pth.tar")
    capsys.readouterr()
    assert main(["train", *QUICK, "--epochs", "2", "--resume", last, *out]) == 2
    err = capsys.readouterr().err
    assert "its run built the model with `--model-kwargs ws=deepmind act=gelu_tanh`, this run with `neither`" in err
    assert main(["train", *QUICK, "--epochs", "2", "--resume", "auto", "--pretrained-path", str(converted), *out]) == 0
    assert "its weights over the starting ones" in capsys.readouterr().out
    assert main(["train", *QUICK, "--epochs", "3", "--resume", last, "--model-kwargs", "ws=deepmind", "act=gelu_tanh",
                 *out]) == 0
