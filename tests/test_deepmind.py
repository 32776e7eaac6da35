"""The authors' Haiku checkpoints: conversion, and parity with an independent numpy forward pass.

The numpy model below is written from the paper and the authors' published equations (NHWC,
HWIO kernels, SAME padding, jax.nn.gelu's tanh form); it shares no code with nfnet_hub.
"""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import timm
import torch
from conftest import rel_error
from timm.data import ImageNetInfo

from nfnet_hub.cli import main
from nfnet_hub.models import VARIANTS
from nfnet_hub.models.checkpoint import CheckpointError, create_model
from nfnet_hub.preprocess import readable_labels

GAMMA_GELU = 1.7015043497085571
ALPHA = 0.2


def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))) * GAMMA_GELU


def standardise(w, gain):
    mean = w.mean(axis=(0, 1, 2), keepdims=True)
    var = w.var(axis=(0, 1, 2), keepdims=True)
    scale = 1.0 / np.sqrt(np.maximum(var * np.prod(w.shape[:3]), 1e-4)) * gain
    return w * scale - mean * scale


def conv(x, p, stride=1, groups=1):
    w = standardise(p["w"], p["gain"])
    k, (n, h, wd, _) = w.shape[0], x.shape
    oh, ow = -(-h // stride), -(-wd // stride)
    ph, pw = max((oh - 1) * stride + k - h, 0), max((ow - 1) * stride + k - wd, 0)
    xp = np.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    cout = w.shape[3]
    out = np.zeros((n, oh, ow, cout))
    for i in range(k):
        for j in range(k):
            patch = xp[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :].reshape(n, oh, ow, groups, -1)
            kernel = w[i, j].reshape(-1, groups, cout // groups)
            out += np.einsum("nhwgc,cgo->nhwgo", patch, kernel).reshape(n, oh, ow, cout)
    return out + p["b"]


def authors_forward(params, x, widths, depths, group_size=128):
    """The authors' NFNet.__call__ / NFBlock.__call__ in inference mode."""
    out = x
    for i in range(4):
        out = conv(out, params[f"NFNet/~/stem_conv{i}"], stride=2 if i in (0, 3) else 1)
        out = gelu(out) if i < 3 else out
    index, expected_std, ch = 0, 1.0, widths[0] // 2
    for width, depth, stride in zip(widths, depths, [1, 2, 2, 2]):
        for bi in range(depth):
            name = "NFNet/~/nf_block" + (f"_{index}" if index else "")
            s = stride if bi == 0 else 1
            mid = int(width * 0.5)
            groups = mid // group_size
            h = gelu(out) * (1.0 / expected_std)
            if s > 1:
                n, hh, ww, c = h.shape
                pooled = h.reshape(n, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))  # 2x2 SAME avg pool, even sizes
                shortcut = conv(pooled, params[f"{name}/~/conv_shortcut"])
            elif ch != width:
                shortcut = conv(h, params[f"{name}/~/conv_shortcut"])
            else:
                shortcut = out
            y = conv(h, params[f"{name}/~/conv0"])
            y = conv(gelu(y), params[f"{name}/~/conv1"], stride=s, groups=groups)
            y = conv(gelu(y), params[f"{name}/~/conv1b"], groups=groups)
            y = conv(gelu(y), params[f"{name}/~/conv2"])
            se0, se1 = params[f"{name}/~/squeeze_excite/~/linear"], params[f"{name}/~/squeeze_excite/~/linear_1"]
            pooled = y.mean(axis=(1, 2))
            gate = 1 / (1 + np.exp(-(np.maximum(pooled @ se0["w"] + se0["b"], 0) @ se1["w"] + se1["b"])))
            y = (gate[:, None, None, :] * 2) * y
            out = y * params[name]["skip_gain"] * ALPHA + shortcut
            ch, index = width, index + 1
            expected_std = 1.0 if bi == 0 else expected_std
            expected_std = (expected_std ** 2 + ALPHA ** 2) ** 0.5
    out = gelu(conv(out, params["NFNet/~/final_conv"]))
    fc = params["NFNet/~/linear"]
    return out.mean(axis=(1, 2)) @ fc["w"] + fc["b"]


def authors_params(widths, depths, classes, group_size=128, stem=(16, 32, 64), seed=0):
    """Random parameters in the authors' Haiku layout, every gain and skip gain randomised."""
    rng = np.random.default_rng(seed)
    params = {}

    def conv_p(k, cin, cout):
        return {"w": rng.standard_normal((k, k, cin, cout)).astype(np.float32),
                "gain": (1 + 0.3 * rng.standard_normal(cout)).astype(np.float32),
                "b": (0.1 * rng.standard_normal(cout)).astype(np.float32)}

    cin = 3
    for i, c in enumerate((*stem, widths[0] // 2)):
        params[f"NFNet/~/stem_conv{i}"] = conv_p(3, cin, c)
        cin = c
    index = 0
    for si, (width, depth) in enumerate(zip(widths, depths)):
        for bi in range(depth):
            name = "NFNet/~/nf_block" + (f"_{index}" if index else "")
            mid = int(width * 0.5)
            gw = group_size
            params[f"{name}/~/conv0"] = conv_p(1, cin, mid)
            params[f"{name}/~/conv1"] = conv_p(3, gw, mid)
            params[f"{name}/~/conv1b"] = conv_p(3, gw, mid)
            params[f"{name}/~/conv2"] = conv_p(1, mid, width)
            if bi == 0 and (si > 0 or cin != width):
                params[f"{name}/~/conv_shortcut"] = conv_p(1, cin, width)
            hidden = int(width * 0.5)
            params[f"{name}/~/squeeze_excite/~/linear"] = {
                "w": (rng.standard_normal((width, hidden)) / np.sqrt(width)).astype(np.float32),
                "b": (0.1 * rng.standard_normal(hidden)).astype(np.float32)}
            params[f"{name}/~/squeeze_excite/~/linear_1"] = {
                "w": (rng.standard_normal((hidden, width)) / np.sqrt(hidden)).astype(np.float32),
                "b": (0.1 * rng.standard_normal(width)).astype(np.float32)}
            params[name] = {"skip_gain": np.float32(0.5 * rng.standard_normal())}
            cin, index = width, index + 1
    params["NFNet/~/final_conv"] = conv_p(1, cin, 2 * cin)
    params["NFNet/~/linear"] = {"w": (0.05 * rng.standard_normal((2 * cin, classes))).astype(np.float32),
                                "b": (0.1 * rng.standard_normal(classes)).astype(np.float32)}
    return params


def assert_follows_the_authors(model, params, v, batch: int, size: int) -> None:
    x = np.random.default_rng(size).standard_normal((batch, size, size, 3))
    expected = authors_forward(params, x, v.widths, v.depths, v.group_size)
    with torch.no_grad():
        got = model(torch.from_numpy(x.transpose(0, 3, 1, 2)).float()).double()
    assert rel_error(got, torch.from_numpy(expected)) <= 1e-5


def write_npz(params, path):
    np.savez(path, **{f"{mod}/{k}": v for mod, ps in params.items() for k, v in ps.items()})


@pytest.mark.parametrize("form", ["zip", "pickle"])
def test_nano_follows_the_authors_numerics(tmp_path, form):
    v = VARIANTS["nano"]
    params = authors_params(v.widths, v.depths, classes=10, group_size=v.group_size, stem=v.stem_channels[:3])
    path = tmp_path / "nano_haiku.npz"
    if form == "zip":
        write_npz(params, path)
    else:  # the authors publish a pickled {module: {param: array}}
        path.write_bytes(pickle.dumps(params))
    assert main(["convert", "deepmind", str(path), "--model", "nfnet_hub_nano", "--num-classes", "10",
                 "--out", str(tmp_path / "nano.safetensors")]) == 0
    model = create_model("nfnet_hub_nano", tmp_path / "nano.safetensors").eval()
    assert model.cfg.ws == "deepmind" and model.cfg.act == "gelu_tanh"
    assert_follows_the_authors(model, params, v, batch=2, size=32)


def test_f0_converted_weights_follow_the_authors_numerics(tmp_path, capsys):
    v = VARIANTS["f0"]
    params = authors_params(v.widths, v.depths, classes=1000)
    write_npz(params, tmp_path / "F0_haiku.npz")
    # without --model: the variant whose names and shapes it has (F0, not F0+ of the same depth)
    assert main(["convert", "deepmind", str(tmp_path / "F0_haiku.npz"), "--out", str(tmp_path / "f0.safetensors")]) == 0
    assert "the authors' nfnet_hub_f0, in their numerics" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="does not fit nfnet_hub_f1: it holds the authors' nfnet_hub_f0"):
        create_model("nfnet_hub_f1", tmp_path / "F0_haiku.npz")
    model = timm.create_model("nfnet_hub_f0.deepmind_in1k", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "f0.safetensors"))).eval()
    assert_follows_the_authors(model, params, v, batch=1, size=64)
    # the authors published ImageNet weights only: their classes are named, as timm names ImageNet's
    names = ImageNetInfo().label_descriptions()
    for source in (tmp_path / "f0.safetensors", tmp_path / "F0_haiku.npz"):
        assert readable_labels(create_model("nfnet_hub_f0", source).pretrained_cfg) == names


def test_bad_deepmind_checkpoints(tmp_path):
    v = VARIANTS["f0"]
    params = authors_params(v.widths, v.depths, classes=1000)
    params["NFNet/~/mystery"] = {"w": np.zeros(3, np.float32)}
    write_npz(params, tmp_path / "extra.npz")
    with pytest.raises(CheckpointError, match="mystery"):
        create_model("nfnet_hub_f0", tmp_path / "extra.npz")
    del params["NFNet/~/mystery"], params["NFNet/~/nf_block_3/~/conv1b"]
    write_npz(params, tmp_path / "missing.npz")
    with pytest.raises(CheckpointError, match=r"missing \(3\): stages.2.0.conv2b"):
        create_model("nfnet_hub_f0", tmp_path / "missing.npz")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.npz").write_bytes(pickle.dumps({"NFNet/~/linear": {"w": Evil()}}))
    with pytest.raises(CheckpointError, match="refusing to unpickle builtins.print"):
        create_model("nfnet_hub_f0", tmp_path / "evil.npz")
