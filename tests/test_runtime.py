"""The torch-free runtime: timm's eval preprocessing in numpy, and logits equal to timm's model."""
from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from conftest import randomise, rel_error
from PIL import Image
from timm.data import create_transform, resolve_data_config

from nfnet_hub.errors import UsageError
from nfnet_hub.export import export_onnx
from nfnet_hub.preprocess import list_images
from nfnet_hub.runtime import OnnxClassifier, Preprocess, load_image, parse_source, split_revision


def test_importing_the_runtime_does_not_import_torch():
    code = ("import sys, nfnet_hub.runtime as r; assert 'torch' not in sys.modules, 'torch imported'; "
            "import onnxruntime, numpy, PIL; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.parametrize("cfg", [
    dict(input_size=(3, 256, 256), crop_pct=0.9, crop_mode="squash", interpolation="bicubic"),
    dict(input_size=(3, 224, 224), crop_pct=0.875, crop_mode="center", interpolation="bilinear"),
    dict(input_size=(3, 64, 64), crop_pct=1.0, crop_mode="center", interpolation="bicubic"),
    dict(input_size=(3, 64, 96), crop_pct=0.875, crop_mode="center", interpolation="bicubic"),
    dict(input_size=(3, 96, 64), crop_pct=0.95, crop_mode="center", interpolation="bilinear"),
    dict(input_size=(3, 64, 128), crop_pct=0.9, crop_mode="squash", interpolation="bicubic"),
    # crop_pct above 1 zooms out: the resized image is padded, with the odd pixel after (a pixel off before)
    dict(input_size=(3, 32, 32), crop_pct=1.1, crop_mode="center", interpolation="bicubic"),
    dict(input_size=(3, 33, 47), crop_pct=1.15, crop_mode="squash", interpolation="bilinear"),
    # border: the longest side fits, the rest padded with the mean colour
    dict(input_size=(3, 64, 64), crop_pct=1.0, crop_mode="border", interpolation="bicubic"),
    dict(input_size=(3, 33, 47), crop_pct=0.9, crop_mode="border", interpolation="bilinear"),
], ids=["squash-bicubic", "center-bilinear", "center-full", "center-wide", "center-tall", "squash-wide",
        "center-zoom-out", "squash-zoom-out", "border-full", "border-odd"])
def test_preprocessing_matches_timm_on_real_photos(cfg, sample_images):
    full = {**cfg, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    transform = create_transform(**resolve_data_config(pretrained_cfg=full), is_training=False)
    pre = Preprocess.from_pretrained_cfg(full)
    for path in sorted(sample_images.iterdir()):
        expected = transform(load_image(path)).numpy()
        got = pre(path)
        assert got.shape == expected.shape == (3, *cfg["input_size"][1:])
        np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=path.name)


@pytest.mark.parametrize("cfg, message", [
    (dict(crop_mode="letterbox"), "crop_mode 'letterbox' is not supported: choose center, squash, border"),
    (dict(crop_pct=-0.9), "crop_pct must be positive, got -0.9"),
])
def test_a_transform_timm_would_not_apply_is_refused(cfg, message):
    with pytest.raises(UsageError, match=re.escape(message)):
        Preprocess.from_pretrained_cfg({"input_size": (3, 32, 32), **cfg})

def test_image_modes_are_handled(sample_images):
    assert load_image(sample_images / "camera_grey.png").mode == "RGB"
    assert load_image(sample_images / "rocket_rgba.png").mode == "RGB"
    moon16 = np.asarray(load_image(sample_images / "moon_16bit.png"))
    moon8 = np.asarray(Image.open(sample_images / "moon_16bit.png"), dtype=np.float64) / 257
    assert moon16.dtype == np.uint8 and np.abs(moon16[..., 0] - moon8).max() <= 1  # rescaled, not clipped
    (sample_images.parent / "not_image.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(sample_images.parent / "not_image.txt")


def test_image_folders_are_read_recursively_without_hidden_files(sample_images, tmp_path):
    """What a zip made on a Mac or a notebook leaves beside the photos is not theirs to classify."""
    photos = sorted(sample_images.iterdir())[:2]
    (tmp_path / "cats" / ".ipynb_checkpoints").mkdir(parents=True)
    shutil.copy(photos[0], tmp_path / "cats" / "a.png")
    shutil.copy(photos[1], tmp_path / "cats" / "B.PNG")
    shutil.copy(photos[0], tmp_path / "cats" / ".ipynb_checkpoints" / "a-checkpoint.png")
    (tmp_path / "cats" / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (tmp_path / "notes.txt").write_text("mine")
    assert list_images(tmp_path) == [tmp_path / "cats" / "B.PNG", tmp_path / "cats" / "a.png"]
    assert list_images(tmp_path / "cats" / ".ipynb_checkpoints")  # a hidden folder named itself is read
    # linked folders are read, as timm's folder reader reads them, each folder once, a link back up without a loop
    (tmp_path / "view").mkdir()
    (tmp_path / "view" / "cats").symlink_to(tmp_path / "cats", target_is_directory=True)
    (tmp_path / "view" / "again").symlink_to(tmp_path / "cats", target_is_directory=True)
    (tmp_path / "cats" / "up").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "cats" / "folder.png").mkdir()
    assert list_images(tmp_path / "view") == [tmp_path / "view" / "again" / n for n in ("B.PNG", "a.png")]
    assert list_images(tmp_path) == [tmp_path / "cats" / "B.PNG", tmp_path / "cats" / "a.png"]
    (tmp_path / "hidden" / ".cache").mkdir(parents=True)
    shutil.copy(photos[0], tmp_path / "hidden" / ".cache" / "a.png")
    with pytest.raises(ValueError, match="no images .* under"):
        list_images(tmp_path / "hidden")


@pytest.mark.parametrize("size, crop_mode", [((64, 64), "center"), ((64, 96), "center"), ((64, 96), "border")],
                         ids=["square", "wide", "wide-border"])
def test_runtime_logits_equal_the_timm_model_on_real_photos(sample_images, tmp_path, size, crop_mode):
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=10), seed=7)
    model.pretrained_cfg = {**model.pretrained_cfg, "test_input_size": (3, *size), "crop_pct": 0.9,
                            "crop_mode": crop_mode}
    export_onnx(model, tmp_path / "model.onnx", label_names=[f"c{i}" for i in range(10)])
    clf = OnnxClassifier(tmp_path / "model.onnx")  # preprocessing and labels from the ONNX metadata alone
    assert clf.providers == ["CPUExecutionProvider"] and clf.device == "cpu"
    transform = create_transform(**resolve_data_config(model=model, use_test_size=True), is_training=False)
    paths = sorted(sample_images.iterdir())
    x = torch.stack([transform(load_image(p)) for p in paths])
    with torch.no_grad():
        expected = model(x)
    got = clf.logits(np.stack([clf.preprocess(p) for p in paths]))
    assert rel_error(torch.from_numpy(got), expected) < 1e-5
    preds = clf.predict(paths, top_k=3, batch_size=4)
    assert [p[0].index for p in preds] == expected.argmax(-1).tolist()
    assert all(p[0].label == f"c{p[0].index}" and p[0].probability >= p[1].probability for p in preds)
    probs = torch.softmax(expected.double(), -1).max(-1).values.tolist()
    assert [p[0].probability for p in preds] == pytest.approx(probs, rel=1e-4)
    # the same images as encoded bytes, PIL images and RGB(A) arrays, and a lone path: the same predictions
    arrays = [np.asarray(Image.open(p)) if Image.open(p).mode == "RGBA" else np.asarray(load_image(p)) for p in paths]
    assert {a.shape[-1] for a in arrays} == {3, 4}
    for images in ([p.read_bytes() for p in paths], [Image.open(p) for p in paths], arrays):
        assert clf.predict(images, top_k=3, batch_size=4) == preds
    assert clf.predict(paths[0], top_k=3) == preds[:1] == clf.predict(str(paths[0]), top_k=3)
    with open(paths[0], "rb") as f:  # a binary file object (an upload) is one image, not an iterable of its lines
        assert clf.predict(f, top_k=3) == preds[:1]
    assert clf.predict([io.BytesIO(p.read_bytes()) for p in paths], top_k=3, batch_size=4) == preds
    for bad, words in ((arrays[0], "a bare array could be one image or several"),
                       ([arrays[0].astype(np.float32)], r"uint8 pixels.*got float32 of shape"),
                       ([arrays[0].transpose(2, 0, 1)], r"got uint8 of shape \[3, "), ([7], "not int"),
                       ([b"not an image"], "12 bytes is not a readable image: cannot identify image file$"),
                       (io.BytesIO(b"not an image"), "an image read from a BytesIO is not a readable image"),
                       ([arrays[0][:0]], r"an image of \d+x0 pixels has none to classify"),
                       (Image.new("RGB", (0, 5)), "an image of 0x5 pixels has none to classify"),
                       (None, r"an image or a list of them \(file paths, .*\), not NoneType"),
                       (paths[0].parent, r"is a folder, not an image: pass its images \(list_images\(folder\)")):
        with pytest.raises(ValueError, match=words):
            clf.predict(bad)
    with pytest.raises(ValueError, match="no images"):
        clf.predict([])
    with pytest.raises(ValueError, match="top_k"):
        clf.predict(paths, top_k=0)
    h, w = size  # logits: raw uint8 pixels gave confident nonsense; a wrong layout, ONNX Runtime's three lines
    batch = np.stack([clf.preprocess(p) for p in paths])
    assert clf.predictions(batch, top_k=3) == preds  # what predict gives, from a batch preprocessed beforehand
    for bad, words in ((np.clip(batch * 60 + 128, 0, 255).astype(np.uint8),  # pixels of the right shape
                        rf"got uint8 \[{len(paths)}, 3, {h}, {w}\]; images as uint8 pixels go to predict\(\)"),
                       (batch.transpose(0, 2, 3, 1), rf"float batch \[N, 3, {h}, {w}\] \(NCHW: .*got float32 "
                                                     rf"\[{len(paths)}, {h}, {w}, 3\]$"),
                       (batch[0], rf"got float32 \[3, {h}, {w}\]$")):
        with pytest.raises(ValueError, match=words):
            clf.logits(bad)
    np.testing.assert_array_equal(clf.logits(batch.astype(np.float64)), got)  # other floats: as float32


def test_bad_models_and_repo_ids(tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a loadable ONNX model") as e:
        OnnxClassifier(tmp_path / "model.onnx")
    assert "checksum" not in str(e.value)  # no bundle, no checksums: nothing more to say
    with pytest.raises(ValueError, match="no ONNX model at"):
        OnnxClassifier(tmp_path / "missing.onnx")
    with pytest.raises(ValueError, match="no bundle folder or ONNX file at not-a-folder-nor-repo"):
        OnnxClassifier.from_pretrained("not-a-folder-nor-repo")
    with pytest.raises(ValueError, match="neither a bundle folder nor a Hub repo id"):
        OnnxClassifier.from_pretrained("me/a..b")
    with pytest.raises(ValueError, match="'me/nano@v1' pins revision 'v1', but revision 'main' is given too"):
        OnnxClassifier.from_pretrained("hf-hub:me/nano@v1", revision="main")
    for text, words in (("{not json", "is not valid JSON"), ('{"architecture": "x"}', "has no pretrained_cfg"),
                        ("[1, 2]", "has no pretrained_cfg")):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=words):
            OnnxClassifier.from_pretrained(tmp_path)


def test_hub_names_and_revisions_are_told_from_paths(tmp_path, monkeypatch):
    """timm's ORG/NAME@REVISION pins a branch, tag or commit (refs/pr/1 holds '/'); paths stay local."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert [parse_source(n) for n in ("me/nano@v1", "hf-hub:me/nano@refs/pr/1", "me/nano", "runs/b@v1",
                                      "local-dir:me@x/y", "./me/nano@v1")] == [
        ("me/nano@v1", False), ("me/nano@refs/pr/1", False), ("me/nano", False), ("runs/b@v1", True),
        ("me@x/y", True), ("./me/nano@v1", True)]
    assert split_revision("me/nano@refs/pr/1") == ("me/nano", "refs/pr/1")
    assert split_revision("me/nano", "dev") == ("me/nano", "dev")
    assert split_revision("me/nano@v1", "v1") == ("me/nano", "v1")


def test_a_bundle_file_cut_short_is_said_to_differ_from_its_checksum(nano_bundle, tmp_path):
    """A partial copy or download of a bundle failed as ONNX Runtime's 'Protobuf parsing failed' only; the file's
    checksum says what happened; the whole file loads again."""
    copy = shutil.copytree(nano_bundle, tmp_path / "bundle")
    onnx_bytes = (copy / "model.onnx").read_bytes()
    (copy / "model.onnx").write_bytes(onnx_bytes[: len(onnx_bytes) // 2])
    with pytest.raises(UsageError, match=r"model.onnx is not a loadable ONNX model: .*\(model.onnx does not match the "
                                         r"bundle's checksums.sha256: a partial copy or download\? copy the bundle "
                                         r"again\)$"):
        OnnxClassifier.from_pretrained(copy)
    (copy / "model.onnx").write_bytes(onnx_bytes)
    assert OnnxClassifier.from_pretrained(copy).labels


def test_providers_this_runtime_lacks_are_refused_unless_the_cpu_is_listed_after_them(nano_bundle):
    """ONNX Runtime would run on its CPU provider instead, with a warning, even for a misspelt name."""
    import onnxruntime as ort

    asked = [["CUDAProvider"]] + [["CUDAExecutionProvider"]] * ("CUDAExecutionProvider" not in
                                                                ort.get_available_providers())
    for providers in asked:
        with pytest.raises(ValueError, match=rf"^none of the providers asked for \({providers[0]}\) is in this ONNX "
                                             r"Runtime, which has .*CPUExecutionProvider"):
            OnnxClassifier.from_pretrained(nano_bundle, providers=providers)
    if len(asked) == 2:
        with pytest.raises(ValueError, match=r"comes with onnxruntime-gpu: pip install 'nfnet-hub\[gpu\]'"):
            OnnxClassifier.from_pretrained(nano_bundle, providers=["CUDAExecutionProvider"])
    clf = OnnxClassifier.from_pretrained(nano_bundle, providers=["CUDAProvider", "CPUExecutionProvider"])
    assert clf.providers == ["CPUExecutionProvider"]


def test_an_onnx_file_is_a_model_of_its_own(trained_nano, nano_bundle, digits_folders, tmp_path):
    """What ``export`` writes (out/model.onnx, no bundle around it) predicts, from its own metadata, what the bundle
    of the same weights predicts; a bundle's file given itself is that bundle's model."""
    import onnx

    export_onnx(trained_nano["model"], tmp_path / "out" / "model.onnx")
    images = list_images(digits_folders / "validation")[:16]
    bundled = OnnxClassifier.from_pretrained(nano_bundle)
    alone = OnnxClassifier.from_pretrained(tmp_path / "out" / "model.onnx")
    assert alone.labels == bundled.labels and alone.preprocess == bundled.preprocess
    x = bundled.preprocess.batch(images)
    np.testing.assert_allclose(alone.logits(x), bundled.logits(x), rtol=1e-5, atol=1e-5)
    int8 = OnnxClassifier.from_pretrained(f"local-dir:{nano_bundle / 'model_int8.onnx'}")
    np.testing.assert_array_equal(int8.logits(x), OnnxClassifier.from_pretrained(
        nano_bundle, filename="model_int8.onnx").logits(x))
    # an ONNX file without nfnet-hub's metadata (timm's export, say) takes the config.json beside it, if any
    plain = onnx.load(nano_bundle / "model.onnx")
    del plain.metadata_props[:]
    shutil.copy(nano_bundle / "config.json", tmp_path / "config.json")
    onnx.save(plain, tmp_path / "plain.onnx")
    np.testing.assert_array_equal(OnnxClassifier(tmp_path / "plain.onnx").logits(x), bundled.logits(x))
    (tmp_path / "config.json").unlink()
    for source, kw, words in ((tmp_path / "plain.onnx", {}, "no preprocessing metadata .* no config.json beside it"),
                              (nano_bundle / "config.json", {}, "is a file but not an ONNX model"),
                              (nano_bundle / "model.onnx", dict(filename="model_int8.onnx"),
                               "is one ONNX file, so it cannot also be model_int8.onnx"),
                              (tmp_path / "missing.onnx", {}, "no bundle folder or ONNX file at")):
        with pytest.raises(ValueError, match=words):
            OnnxClassifier.from_pretrained(source, **kw)
