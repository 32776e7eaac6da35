"""One-channel (greyscale) models, from training to serving, fed as timm's loader feeds them: images read
in mode "L" (timm's ``input_img_mode``), normalised with the mean of the three means and stds where the
config has three (timm's loader, ``adapt_to_chs``)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
from conftest import eight_bit_photos, randomise, rel_error, run_card_code
from PIL import Image
from serving import Server, infer
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform

from nfnet_hub.errors import UsageError
from nfnet_hub.export import export_onnx, validate_onnx
from nfnet_hub.hub import build_bundle
from nfnet_hub.models.checkpoint import load_model
from nfnet_hub.preprocess import Preprocess, apply_data_config, list_images
from nfnet_hub.runtime import OnnxClassifier
from nfnet_hub.train import parse_args, train


def _timm_eval(cfg: dict, paths) -> torch.Tensor:
    """timm's eval transform over images read as timm's loader reads them for one channel."""
    transform = create_transform(**cfg, is_training=False)
    return torch.stack([transform(Image.open(p).convert("L")) for p in paths])


@pytest.mark.parametrize("crop_mode", ["center", "border"])
def test_preprocessing_matches_timms_one_channel_transform(sample_images, crop_mode):
    cfg = dict(input_size=(1, 64, 64), crop_pct=0.9, crop_mode=crop_mode, interpolation="bicubic", mean=(0.45,),
               std=(0.25,))
    pre = Preprocess.from_pretrained_cfg(cfg)
    assert pre.channels == 1 and "greyscale" in pre.describe()
    photos = eight_bit_photos(sample_images)
    np.testing.assert_allclose(pre.batch(photos), _timm_eval(cfg, photos).numpy(), atol=1e-5)


def test_one_mean_and_std_stand_for_every_channel_as_in_timms_data_config():
    pre = Preprocess((8, 8), mean=(0.5,), std=(0.25,))
    assert pre.channels == 3 and pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.25, 0.25, 0.25)
    with pytest.raises(UsageError, match=r"must have a value per input channel \(1\), or one for all"):
        Preprocess((8, 8), channels=1)  # the default mean and std are RGB's


def test_a_model_created_with_one_channel_is_exported_with_timms_loader_normalisation(sample_images, tmp_path):
    """timm leaves the pretrained_cfg of ``in_chans=1`` at three channels; its loader then averages mean and std."""
    model = randomise(timm.create_model("nfnet_hub_nano", in_chans=1, num_classes=10), seed=3)
    assert model.pretrained_cfg["input_size"][0] == 3
    mean, std = (float(np.mean(IMAGENET_DEFAULT_MEAN)),), (float(np.mean(IMAGENET_DEFAULT_STD)),)
    report = export_onnx(model, tmp_path / "grey.onnx", img_size=64)
    clf = OnnxClassifier(tmp_path / "grey.onnx")
    assert clf.session.get_inputs()[0].shape[1:] == [1, 64, 64] and report.img_size == (64, 64)
    assert clf.preprocess.mean == pytest.approx(mean) and clf.preprocess.std == pytest.approx(std)
    photos = eight_bit_photos(sample_images)
    cfg = {k: model.pretrained_cfg[k] for k in ("crop_pct", "crop_mode", "interpolation")}
    x = _timm_eval({**cfg, "input_size": (1, 64, 64), "mean": mean, "std": std}, photos)
    with torch.no_grad():
        expected = model(x)
    assert rel_error(torch.from_numpy(clf.logits(clf.preprocess.batch(photos))), expected) < 1e-5
    with pytest.raises(UsageError, match="grey.onnx takes 1-channel input, the model to compare with takes 3"):
        validate_onnx(tmp_path / "grey.onnx", timm.create_model("nfnet_hub_nano", num_classes=10))
    rgb_config = {"pretrained_cfg": {**model.pretrained_cfg, "input_size": (3, 64, 64)}}
    with pytest.raises(UsageError, match="grey.onnx takes 1-channel input, but its config's preprocessing gives 3"):
        OnnxClassifier(tmp_path / "grey.onnx", rgb_config)


def test_a_three_channel_record_of_a_one_channel_model_is_read_as_its_training_normalised():
    """Checkpoints of earlier versions recorded [3, H, W] and three means for a one-channel run."""
    record = {"input_size": [3, 32, 32], "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bicubic",
              "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.3, 0.1], "label_names": None}
    cfg = apply_data_config({"architecture": "nfnet_hub_nano"}, record, channels=1)
    assert cfg["input_size"] == (1, 32, 32) and cfg["mean"] == pytest.approx((0.5,))
    assert cfg["std"] == pytest.approx((0.2,))


@pytest.fixture(scope="module")
def grey_run(digits_folders, tmp_path_factory):
    """nano trained on the digit image folders with --in-chans 1 alone (timm's train.py would feed it RGB)."""
    out = tmp_path_factory.mktemp("grey")
    result = train(parse_args(["--data-dir", str(digits_folders), "--model", "nfnet_hub_nano", "--in-chans", "1",
                               "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.2", "--batch-size", "64",
                               "--clip-mode", "agc", "--clip-grad", "0.02", "--workers", "0", "--no-progress",
                               "--log-interval", "0", "--output", str(out), "--experiment", "grey"]))
    return result, out / "grey"


def test_training_records_one_channel_with_timms_loader_normalisation(grey_run, digits_folders, tmp_path):
    result, run = grey_run
    record = result["model"].pretrained_cfg
    mean = (float(np.mean(IMAGENET_DEFAULT_MEAN)),)
    assert tuple(record["input_size"]) == (1, 32, 32) and record["mean"] == pytest.approx(mean)
    model, _ = load_model("nfnet_hub_nano", run / "model_best.pth.tar")
    assert model.in_chans == 1 and tuple(model.pretrained_cfg["input_size"]) == (1, 32, 32)
    # --no-prefetcher normalises in the dataset's transform, which must take the one-channel mean too
    again = train(parse_args(["--data-dir", str(digits_folders), "--model", "nfnet_hub_nano", "--in-chans", "1",
                              "--img-size", "32", "--epochs", "1", "--batch-size", "64", "--no-prefetcher",
                              "--workers", "0", "--no-progress", "--log-interval", "0", "--output", str(tmp_path)]))
    assert tuple(again["model"].pretrained_cfg["input_size"]) == (1, 32, 32)


def test_digits_train_a_one_channel_model_at_the_input_size(tmp_path):
    """--input-size gives the channels and the size, over --img-size (timm's resolve_data_config)."""
    result = train(parse_args(["--dataset", "digits", "--model", "nfnet_hub_nano", "--input-size", "1", "40", "40",
                               "--img-size", "32", "--epochs", "1", "--batch-size", "64", "--no-progress",
                               "--log-interval", "0", "--output", str(tmp_path)]))
    cfg = result["model"].pretrained_cfg
    assert result["model"].in_chans == 1
    assert tuple(cfg["input_size"]) == (1, 40, 40) and tuple(cfg["mean"]) == (0.27,)


def test_bundle_timm_runtime_and_server_take_the_greyscale_model(grey_run, digits_folders, tmp_path):
    _, run = grey_run
    model, _ = load_model("nfnet_hub_nano", run / "model_best.pth.tar")
    model = randomise(model, seed=5)  # two epochs leave the gains near their start
    images = list_images(digits_folders / "validation")[::40]
    calibration = Preprocess.for_model(model).batch(list_images(digits_folders / "train")[::10])
    bundle = build_bundle(model, tmp_path / "bundle", precisions=("fp32", "int8"), calibration=calibration,
                          repo_id="me/grey", progress=False, force=True)
    config = json.loads((bundle / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 32, 32] and len(config["pretrained_cfg"]["mean"]) == 1
    assert "32x32 greyscale (1 channel)" in (bundle / "README.md").read_text()
    with_timm, with_runtime = run_card_code(bundle, "me/grey", images[0])  # the card's code reads greyscale
    assert '.convert("L")' in (bundle / "README.md").read_text()
    best = OnnxClassifier.from_pretrained(bundle).predict(images[0])[0][0]
    assert with_timm.splitlines()[0].split("%  ")[1] == best.label and with_runtime.startswith(f"[[{best!r}")
    hub_model = timm.create_model(f"local-dir:{bundle}", pretrained=True).eval()
    assert hub_model.in_chans == 1
    x = _timm_eval(timm.data.resolve_data_config(model=hub_model), images)
    clf = OnnxClassifier.from_pretrained(bundle)
    with torch.no_grad():
        expected = hub_model(x)
    assert rel_error(torch.from_numpy(clf.logits(clf.preprocess.batch(images))), expected) < 1e-5
    report = validate_onnx(bundle / "model.onnx", model, images)
    assert report.preprocessing.startswith("32x32 px greyscale") and report.top1_agreement == 1.0

    server = Server(str(bundle), "--name", "grey")
    url = server.__enter__()
    try:
        pixels = clf.preprocess.batch(images[:2])
        status, answer = infer(url, "grey", pixels)
        assert status == 200, answer
        np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (2, -1)), clf.logits(pixels), atol=1e-5)
        status, answer = infer(url, "grey", np.zeros((1, 3, 32, 32), np.float32))
        assert status == 400 and "must have shape [N,1,32,32]" in answer["error"], answer
    finally:
        assert server.stop() == 0, server.output
    assert "input 1x32x32" in server.output
    assert "bad request, refused: input 'pixel_values' must have shape [N,1,32,32]" in server.output
    assert "Exception:" not in server.output, server.output


def test_image_folders_train_on_the_pixels_the_runtime_reads(digits_folders, tmp_path):
    """timm reads .png, .jpg and .jpeg only, and clips 16-bit images to white; the runtime reads .bmp, .tif ... and
    rescales 16-bit images. The same digits as 8-bit PNGs, 16-bit PNGs and BMP/TIFF files train the same weights."""
    forms = {"png8": lambda a, p: Image.fromarray(a).save(p.with_suffix(".png")),
             "png16": lambda a, p: Image.fromarray(a.astype(np.uint16) * 257).save(p.with_suffix(".png")),
             "bmp-tif": lambda a, p: Image.fromarray(a).save(p.with_suffix(".bmp" if int(p.stem) % 2 else ".tif"))}
    for split, step in (("train", 4), ("validation", 8)):
        for src in list_images(digits_folders / split)[::step]:
            pixels = np.asarray(Image.open(src).convert("L"))
            for form, save in forms.items():
                (tmp_path / form / split / src.parent.name).mkdir(parents=True, exist_ok=True)
                save(pixels, tmp_path / form / split / src.parent.name / src.name)
    weights = {}
    for form in forms:
        result = train(parse_args(["--data-dir", str(tmp_path / form), "--model", "nfnet_hub_nano", "--in-chans", "1",
                                   "--epochs", "1", "--warmup-epochs", "0", "--lr", "0.2", "--batch-size", "32",
                                   "--workers", "0", "--no-progress", "--log-interval", "0", "--output",
                                   str(tmp_path / "runs"), "--experiment", form]))
        weights[form] = result["model"].state_dict()
    gains = [t for name, t in weights["png8"].items() if name.endswith("skipinit_gain")]
    assert gains and all(g.abs().max() > 0 for g in gains)  # it trained: skip gains start at zero
    for form in ("png16", "bmp-tif"):
        for name, tensor in weights["png8"].items():
            assert torch.equal(weights[form][name], tensor), (form, name)
