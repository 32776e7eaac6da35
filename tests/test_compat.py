"""timm's standards of a model: it scripts, traces with torch.fx (through timm's tracer) and exports with
torch.export, and the results compute what the eager model computes, forward and backward. The same for
fold()'s output. Every gain is randomised (at initialisation skip gains are zero and hide the branches)."""
from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from conftest import randomise, rel_error
from timm.models import create_feature_extractor, get_graph_node_names

from nfnet_hub import fold
from nfnet_hub.models.nfnet import DEEPMIND_NUMERICS

MODELS = [("nfnet_hub_nano", {}), ("nfnet_hub_nano", DEEPMIND_NUMERICS), ("nfnet_hub_nano", {"act": "relu"}),
          ("nfnet_hub_f0", {}), ("nfnet_hub_f0_plus", {})]
IDS = ["nano", "nano-deepmind-gelu_tanh", "nano-relu", "f0", "f0_plus"]
SIZE = 64


def _model(name: str, kwargs: dict) -> torch.nn.Module:
    return randomise(timm.create_model(name, num_classes=8, **kwargs), seed=5)


def _forward_backward(module, x: torch.Tensor, params) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits, and the gradients of a fixed projection of them for the input and ``params``."""
    x = x.clone().requires_grad_(True)
    out = module(x)
    weights = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    grads = torch.autograd.grad((out * weights).sum(), [x, *params])
    return out.detach(), list(grads)


def _assert_same(module, reference: torch.nn.Module, x: torch.Tensor) -> None:
    params = [p for p in reference.parameters()]
    out, grads = _forward_backward(module, x, params)
    ref_out, ref_grads = _forward_backward(reference, x, params)
    assert rel_error(out, ref_out) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_error(g, r) < 1e-4


@pytest.mark.parametrize("name,kwargs", MODELS, ids=IDS)
def test_scripts_like_timm_models_and_computes_the_same(name, kwargs):
    model = _model(name, kwargs)
    x = torch.randn(2, 3, SIZE, SIZE)
    _assert_same(torch.jit.script(model), model, x)
    with timm.layers.set_layer_config(scriptable=True):
        scriptable = _model(name, kwargs)
    torch.testing.assert_close(torch.jit.script(scriptable)(x), scriptable(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", MODELS, ids=IDS)
def test_traces_with_timm_fx_and_computes_the_same(name, kwargs):
    model = _model(name, kwargs)
    x = torch.randn(2, 3, SIZE, SIZE)
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert any(n.startswith("stages.3.") for n in eval_nodes) and "head.fc" in eval_nodes
    traced = create_feature_extractor(model, return_nodes={"head.fc": "logits"})
    _assert_same(lambda t: traced(t)["logits"], model, x)
    scripted = torch.jit.script(traced)  # timm's test_model_forward_fx_torchscript: traced, then scripted
    _assert_same(lambda t: scripted(t)["logits"], model, x)
    built = []
    for feature_cls in ("fx", None):  # the same weights (same seeds, same parameter order), two feature wrappers
        torch.manual_seed(0)
        features = timm.create_model(name, features_only=True, feature_cls=feature_cls, **kwargs)
        built.append(randomise(features, seed=5))
    fx_features, plain = built
    assert [type(m).__name__ for m in (fx_features, plain)] == ["FeatureGraphNet", "FeatureListNet"]
    with torch.no_grad():
        for a, b in zip(fx_features(x), plain(x), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("name,kwargs", [MODELS[i] for i in (0, 1, 3, 4)], ids=[IDS[i] for i in (0, 1, 3, 4)])
def test_exports_with_torch_export_and_computes_the_same(name, kwargs, strict):
    model = _model(name, kwargs)
    x = torch.randn(2, 3, SIZE, SIZE)
    exported = torch.export.export(model, (x,), strict=strict).module()
    _assert_same(exported, model, torch.randn(2, 3, SIZE, SIZE))


@pytest.mark.parametrize("name", ["nfnet_hub_nano", "nfnet_hub_f0", "nfnet_hub_f0_plus", "dm_nfnet_f0"])
def test_folded_models_script_trace_and_export(name):
    model = _model(name, {})
    folded = fold(model, img_size=SIZE)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = model(x)
        traced = create_feature_extractor(folded, return_nodes={"head.fc": "logits"})
        for compiled in (torch.jit.script(folded), torch.fx.symbolic_trace(folded), traced, torch.jit.script(traced),
                         torch.export.export(folded, (x,)).module()):
            out = compiled(x)
            assert rel_error(out["logits"] if isinstance(out, dict) else out, expected) < 1e-5
        with pytest.raises(Exception, match="folded for 64x64 inputs"):  # the size check survives scripting
            torch.jit.script(folded)(torch.randn(1, 3, 96, 96))


def test_prepacked_models_refuse_scripting_and_export_by_name():
    from nfnet_hub.cpu import prepack

    packed = prepack(fold(_model("nfnet_hub_nano", {}), img_size=SIZE))
    with pytest.raises(ValueError, match="for eager inference on the machine that packed it"):
        torch.jit.script(packed)
    with pytest.raises(ValueError, match="for eager inference on the machine that packed it"):
        torch.export.export(packed, (torch.randn(1, 3, SIZE, SIZE),))


def test_commands_take_model_names_as_timm_create_model_does(tmp_path, nano_bundle, capsys):
    """A pretrained tag with local weights, and a local-dir: bundle (hf-hub: names: tests/test_hub.py)."""
    from nfnet_hub.cli import main
    from nfnet_hub.models.checkpoint import save_safetensors

    save_safetensors(_model("nfnet_hub_f0", {}), tmp_path / "f0.safetensors")
    assert main(["export", "nfnet_hub_f0.dm_in1k", "--checkpoint", str(tmp_path / "f0.safetensors"), "--img-size", "32",
                 "--out", str(tmp_path / "f0")]) == 0
    assert (tmp_path / "f0" / "model.onnx").is_file()
    # a tag without downloadable weights (the authors' numerics), given its weights
    assert main(["export", "nfnet_hub_f0.deepmind_in1k", "--checkpoint", str(tmp_path / "f0.safetensors"),
                 "--img-size", "32", "--out", str(tmp_path / "f0-authors")]) == 0
    assert main(["export", f"local-dir:{nano_bundle}", "--out", str(tmp_path / "nano")]) == 0
    out = capsys.readouterr().out
    assert f"weights: pretrained weights of local-dir:{nano_bundle}" in out
    assert "preprocessing: 32x32 px, squash crop 1, bicubic, mean (0.27, 0.27, 0.27)" in out
    x = {"pixel_values": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    exported, bundled = (ort.InferenceSession(f).run(None, x)[0] for f in (tmp_path / "nano" / "model.onnx",
                                                                          nano_bundle / "model.onnx"))
    np.testing.assert_allclose(exported, bundled, rtol=1e-4, atol=1e-5)  # the bundle's weights, not random ones
    assert main(["validate", str(nano_bundle / "model.onnx"), "--model", f"local-dir:{nano_bundle}"]) == 0
    assert '"top1_agreement": 1.0' in capsys.readouterr().out
