"""Models that read images in another mode than RGB or L (timm's ``input_img_mode``: YCbCr, RGBA, CMYK ...), from
training to serving: the mode is recorded with the weights, and the export, the bundle, the runtime and the server read
images in it, as timm's loader read them for training. A model of other channels that records no mode takes arrays."""
from __future__ import annotations

import json
import re
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import eight_bit_photos, randomise, rel_error, run_card_code
from PIL import Image
from serving import Server, infer
from timm.data import create_transform, resolve_data_config

from nfnet_hub.cli import main
from nfnet_hub.errors import UsageError
from nfnet_hub.export import export_onnx
from nfnet_hub.hub import build_bundle
from nfnet_hub.models.checkpoint import load_model
from nfnet_hub.preprocess import Preprocess, apply_data_config, list_images
from nfnet_hub.runtime import OnnxClassifier
from nfnet_hub.train import parse_args, train


def _timm_eval(cfg: dict, mode: str, paths) -> torch.Tensor:
    """timm's eval transform over images read as timm's loader reads them in ``mode``."""
    transform = create_transform(**resolve_data_config(pretrained_cfg=cfg), is_training=False)
    return torch.stack([transform(Image.open(p).convert(mode)) for p in paths])


@pytest.mark.parametrize("mode", ["YCbCr", "RGBA", "CMYK", "LA", "HSV", "LAB", "PA", "1"])
def test_preprocessing_reads_images_in_the_recorded_mode_as_timm(sample_images, mode):
    channels = Image.getmodebands(mode)
    photos = eight_bit_photos(sample_images)
    for crop_mode in ("center", "border"):  # border pads with the mean of each channel
        cfg = dict(input_size=(channels, 48, 40), crop_pct=0.9, crop_mode=crop_mode, interpolation="bicubic",
                   mean=tuple(0.3 + 0.1 * c for c in range(channels)), std=(0.25,) * channels, input_img_mode=mode)
        pre = Preprocess.from_pretrained_cfg(cfg)
        assert pre.image_mode == mode and f"48x40 px {mode}, {crop_mode} crop" in pre.describe()
        np.testing.assert_allclose(pre.batch(photos), _timm_eval(cfg, mode, photos).numpy(), atol=1e-5)


def test_a_mode_of_other_channels_than_the_model_is_refused():
    with pytest.raises(UsageError, match="image mode RGBA has 4 channels, the model takes 3"):
        Preprocess((8, 8), image_mode="RGBA")
    with pytest.raises(UsageError, match="'rgba' is not an image mode"):
        Preprocess((8, 8), channels=4, mean=(0.5,), std=(0.5,), image_mode="rgba")
    for wide in ("F", "I", "I;16"):  # timm's loader hands F pixels over unscaled, and fails on I's
        with pytest.raises(UsageError, match=f"image mode {re.escape(wide)} has .* pixels: timm's loader"):
            Preprocess((8, 8), channels=1, mean=(0.5,), std=(0.5,), image_mode=wide)


@pytest.fixture(scope="module")
def ycbcr_run(digits_folders, tmp_path_factory):
    """nano trained on the digit image folders read as YCbCr (3 channels, but not RGB's pixels)."""
    out = tmp_path_factory.mktemp("ycbcr")
    train(parse_args(["--data-dir", str(digits_folders), "--model", "nfnet_hub_nano", "--input-img-mode", "YCbCr",
                      "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.2", "--batch-size", "64", "--workers", "0",
                      "--no-progress", "--log-interval", "0", "--output", str(out), "--experiment", "ycbcr"]))
    return out / "ycbcr"


def test_a_model_trained_on_ycbcr_pixels_is_exported_bundled_and_served_them(ycbcr_run, digits_folders, tmp_path):
    """Exported without its mode, the runtime would read RGB: other pixels than training's, silently."""
    model, _ = load_model("nfnet_hub_nano", ycbcr_run / "model_best.pth.tar")
    assert model.pretrained_cfg["input_img_mode"] == "YCbCr"
    model = randomise(model, seed=11)  # one epoch leaves the gains near their start
    images = list_images(digits_folders / "validation")[::60]
    with torch.no_grad():
        expected = model.eval()(_timm_eval(model.pretrained_cfg, "YCbCr", images))
    export_onnx(model, tmp_path / "model.onnx")
    clf = OnnxClassifier(tmp_path / "model.onnx")
    assert clf.preprocess.image_mode == "YCbCr"
    assert rel_error(torch.from_numpy(clf.logits(clf.preprocess.batch(images))), expected) < 1e-5

    bundle = build_bundle(model, tmp_path / "bundle", repo_id="me/ycbcr", progress=False)
    config = json.loads((bundle / "config.json").read_text())
    assert config["input_img_mode"] == "YCbCr" and "input_img_mode" not in config["pretrained_cfg"]
    card = (bundle / "README.md").read_text()
    assert "32x32 YCbCr (3 channels)" in card and '.convert("YCbCr")  # the mode it was trained in' in card
    with_timm, _ = run_card_code(bundle, "me/ycbcr", images[0])  # the reader's timm code reads YCbCr too
    assert with_timm.splitlines()[0].endswith(f"  {expected[0].argmax().item()}")
    assert timm.create_model(f"local-dir:{bundle}", pretrained=True).in_chans == 3  # timm still loads the config
    clf = OnnxClassifier.from_pretrained(bundle)
    assert rel_error(torch.from_numpy(clf.logits(clf.preprocess.batch(images))), expected) < 1e-5
    assert [p[0].index for p in clf.predict(images, top_k=1)] == expected.argmax(-1).tolist()
    # the saved model, named as timm names it, keeps its mode: an export of it reads the same pixels
    again, _ = load_model(f"local-dir:{bundle}", pretrained=True)
    assert Preprocess.for_model(again).image_mode == "YCbCr"


def test_a_timm_train_py_checkpoint_keeps_its_image_mode(tmp_path):
    """timm's train.py records its options, --input-img-mode among them, in its checkpoints."""
    import argparse

    model = timm.create_model("nfnet_hub_nano", in_chans=4, num_classes=3)
    args = argparse.Namespace(model="nfnet_hub_nano", input_size=None, img_size=48, in_chans=4, crop_pct=None,
                              mean=None, std=None, interpolation="", input_img_mode="CMYK")
    torch.save({"epoch": 0, "arch": "nfnet_hub_nano", "state_dict": model.state_dict(), "args": args},
               tmp_path / "last.pth.tar")
    loaded, _ = load_model("nfnet_hub_nano", tmp_path / "last.pth.tar")
    pre = Preprocess.for_model(loaded)
    assert (pre.image_mode, pre.channels, pre.input_size) == ("CMYK", 4, (48, 48))


def test_a_four_channel_model_exports_bundles_and_serves_rgba_images(sample_images, tmp_path):
    model = randomise(timm.create_model("nfnet_hub_nano", in_chans=4, num_classes=5), seed=3).eval()
    model.pretrained_cfg = apply_data_config(model.pretrained_cfg, {
        "input_size": [4, 48, 48], "crop_pct": 0.9, "crop_mode": "center", "interpolation": "bicubic",
        "mean": [0.5] * 4, "std": [0.25] * 4, "input_img_mode": "RGBA"})
    photos = eight_bit_photos(sample_images)
    with torch.no_grad():
        expected = model(_timm_eval(model.pretrained_cfg, "RGBA", photos))
    bundle = build_bundle(model, tmp_path / "bundle", repo_id="me/rgba", progress=False)
    assert "48x48 RGBA (4 channels)" in (bundle / "README.md").read_text()
    assert timm.create_model(f"local-dir:{bundle}", pretrained=True).in_chans == 4
    clf = OnnxClassifier.from_pretrained(bundle)
    assert rel_error(torch.from_numpy(clf.logits(clf.preprocess.batch(photos))), expected) < 1e-5
    results = tmp_path / "predictions.json"  # the command reads the files as RGBA too
    assert main(["predict", *map(str, photos), "--model", str(bundle), "--results-file", str(results)]) == 0
    probs = torch.softmax(expected.double(), -1)
    for record, row in zip(json.loads(results.read_text()), probs, strict=True):
        assert record["index"][0] == row.argmax().item()
        np.testing.assert_allclose(record["prob"], row[record["index"]].numpy(), rtol=1e-4, atol=1e-5)

    server = Server(str(bundle), "--name", "rgba")
    url = server.__enter__()
    try:
        last = photos[-3:]  # rocket_rgba.png among them: an alpha channel of its own
        assert "rocket_rgba.png" in [p.name for p in last]
        for pixels, images in ((clf.preprocess.batch(last), ()), (None, [p.read_bytes() for p in last])):
            status, answer = infer(url, "rgba", pixels, images=images)  # the server reads the files as RGBA
            assert status == 200, answer
            np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (3, -1)), expected[-3:].numpy(),
                                       rtol=1e-4, atol=1e-4)
    finally:
        assert server.stop() == 0, server.output
    assert "input 4x48x48" in server.output


def test_a_model_that_records_no_image_mode_takes_arrays_and_refuses_images(sample_images, tmp_path, capsys):
    """Five bands (a satellite's, say) are no image mode: the export serves arrays, and says so for an image."""
    model = randomise(timm.create_model("nfnet_hub_nano", in_chans=5, num_classes=4), seed=2).eval()
    export_onnx(model, tmp_path / "bands.onnx", img_size=32)
    clf = OnnxClassifier(tmp_path / "bands.onnx")
    x = np.random.default_rng(0).standard_normal((2, 5, 32, 32)).astype(np.float32)
    with torch.no_grad():
        assert rel_error(torch.from_numpy(clf.logits(x)), model(torch.from_numpy(x))) < 1e-5
    assert "32x32 px 5-channel" in clf.preprocess.describe()
    photo = str(eight_bit_photos(sample_images)[0])
    with pytest.raises(UsageError, match=r"takes 5-channel input and records no image mode .* \[N, 5, H, W\] arrays"):
        clf.predict(photo)
    assert main(["predict", photo, "--model", str(tmp_path / "bands.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "records no image mode" in err[0]

    server = Server(str(tmp_path / "bands.onnx"), "--name", "bands")
    url = server.__enter__()
    try:
        with urllib.request.urlopen(f"{url}/v2/models/bands", timeout=30) as r:  # no 'image' input to offer
            assert [i["name"] for i in json.loads(r.read())["inputs"]] == ["pixel_values"]
        status, answer = infer(url, "bands", x)
        assert status == 200, answer
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (2, -1)), clf.logits(x), atol=1e-5)
        status, answer = infer(url, "bands", images=(Path(photo).read_bytes(),))
        assert status == 400 and "records no image mode to read images in: send 'pixel_values'" in answer["error"]
    finally:
        assert server.stop() == 0, server.output
    assert "Exception:" not in server.output, server.output
    bundle = build_bundle(model, tmp_path / "bundle", img_size=32, repo_id="me/bands", progress=False)
    card = (bundle / "README.md").read_text()
    assert "It takes 5-channel arrays, not images" in card and "Image.open" not in card and "predict(" not in card
    arrays = "import numpy as np; x = np.zeros((2, 5, 32, 32), np.float32)\n"  # what the card leaves to its reader
    _, with_runtime = run_card_code(bundle, "me/bands", Path(photo), prelude=arrays)
    assert with_runtime.startswith("[[") and len(with_runtime.split("]")) == 4  # two rows of logits
