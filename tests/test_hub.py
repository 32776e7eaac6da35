"""Bundles, publishing and consuming, against a loopback Hub: the real huggingface_hub client
uploads to tests/hub_stub.py (a stand-in for the upload endpoints) and downloads through olah
(a real self-hosted Hub mirror, offline, serving a git repository the test creates)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import timm
import torch
from conftest import eight_bit_photos, randomise, run_card_code
from hub_stub import HubStub
from huggingface_hub import ModelCard
from PIL import Image
from serving import Server, infer
from tritonclient.http import InferenceServerClient, InferInput

from nfnet_hub.cli import main
from nfnet_hub.errors import HubError
from nfnet_hub.export import export_onnx
from nfnet_hub.hub import BundleError, build_bundle, publish, sha256, verify_bundle
from nfnet_hub.onnx_graph import Fp32Graph
from nfnet_hub.runtime import OnnxClassifier

LABELS = [f"class {i}" for i in range(10)]
CALIBRATION = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def model():
    m = randomise(timm.create_model("nfnet_hub_nano", num_classes=10), seed=11)
    m.pretrained_cfg = {**m.pretrained_cfg, "crop_pct": 0.9}
    return m


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    return build_bundle(model, tmp_path_factory.mktemp("b") / "bundle", label_names=LABELS,
                        precisions=("fp32", "fp16", "int8"), calibration=CALIBRATION,
                        metrics={"top1": 91.5, "top5": 98.99999999999999}, dataset="digits", repo_id="me/nano",
                        progress=False, force=True)  # noise: int8 may disagree


def _copy(bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(bundle, dst)
    return dst


def test_bundle_contents_and_card(bundle):
    assert sorted(p.name for p in bundle.iterdir()) == sorted([
        "README.md", "checksums.sha256", "config.json", "export.json", "model.onnx", "model.safetensors",
        "model_fp16.onnx", "model_int8.onnx"])
    cfg = json.loads((bundle / "config.json").read_text())
    assert cfg["architecture"] == "nfnet_hub_nano" and cfg["num_classes"] == 10 and cfg["label_names"] == LABELS
    assert cfg["pretrained_cfg"]["crop_pct"] == 0.9 and cfg["num_features"] == 256
    card = (bundle / "README.md").read_text()
    front = card.split("---")[1]
    for needle in ("library_name: timm", "- onnx", "- nfnet", "pipeline_tag: image-classification", "model-index",
                   "value: 91.5\n", "value: 99.0\n", "license: apache-2.0", "- digits"):
        assert needle in front, needle
    record = json.loads((bundle / "export.json").read_text())
    fp32 = next(e for e in record["exports"] if e["precision"] == "fp32")
    assert f"{fp32['max_rel_error']:.2g}" in card  # figures come from the measurements
    assert "hf-hub:me/nano" in card and "OnnxClassifier.from_pretrained(\"me/nano\")" in card
    assert "input_img_mode" not in json.dumps(cfg) and "trained on images read in mode" not in card  # RGB: timm's own
    int8 = next(e["int8"] for e in record["exports"] if e["precision"] == "int8")  # forced: noise calibration
    assert f"{100 * int8['top1_agreement']:.1f}% of\n{int8['held_out_images']} held-out calibration images" in card
    assert ("below that threshold" in card) == int8["below_threshold"]
    assert "The ONNX files are opset 20 (ONNX Runtime 1.17 or later)." in card
    verify_bundle(bundle)


def test_int8_quantises_the_graph_the_bundles_fp32_export_traced(model, bundle, tmp_path, monkeypatch):
    """torch's exporter (seconds a call) runs once for a bundle's fp32 and int8, whose int8 is the file that
    int8 exported alone is."""
    calls, export = [], torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: calls.append(a[0]) or export(*a, **k))
    out = build_bundle(model, tmp_path / "bundle", label_names=LABELS, precisions=("fp32", "int8"),
                       calibration=CALIBRATION, progress=False, force=True)
    assert len(calls) == 1
    export_onnx(model, tmp_path / "int8.onnx", precision="int8", calibration=CALIBRATION, label_names=LABELS,
                force=True)
    assert len(calls) == 2
    assert (out / "model_int8.onnx").read_bytes() == (tmp_path / "int8.onnx").read_bytes()
    assert (out / "model_int8.onnx").read_bytes() == (bundle / "model_int8.onnx").read_bytes()
    graph, other = Fp32Graph(), randomise(timm.create_model("nfnet_hub_nano", num_classes=10), seed=12)
    for m in (model, other, model):  # other weights are exported anew (a stale graph would fail export's check)
        export_onnx(m, tmp_path / "fp32.onnx", fp32_graph=graph)
    assert len(calls) == 4  # the first model's graph was kept
    block = next(m for m in other.modules() if hasattr(m, "skipinit_gain"))
    for gain in (2e-4, 3e-4):  # a branch gain below 1e-3 folds to a multiplication by a number: another graph
        with torch.no_grad():
            block.skipinit_gain.fill_(gain)
        export_onnx(other, tmp_path / "fp32.onnx", fp32_graph=graph)
    assert len(calls) == 6


def test_a_bundle_for_older_runtimes_has_every_onnx_file_at_its_opset(trained_nano, digits_folders, tmp_path,
                                                                     capsys):
    """Every precision at opset 17, each as good as at the default opset (the digits model: int8 calibrated and
    checked on real images)."""
    from nfnet_hub.preprocess import Preprocess, list_images

    model = trained_nano["model"]
    calib = Preprocess.for_model(model).batch(list_images(digits_folders / "train")[::14])
    out = build_bundle(model, tmp_path / "bundle", precisions=("fp32", "fp16", "int8"), calibration=calib,
                       progress=False, opset=17)
    for name in ("model.onnx", "model_fp16.onnx", "model_int8.onnx"):
        assert [o.version for o in onnx.load(out / name).opset_import if o.domain == ""] == [17], name
    exports = {e["precision"]: e for e in json.loads((out / "export.json").read_text())["exports"]}
    assert exports["fp32"]["max_rel_error"] < 1e-4 and exports["fp16"]["max_rel_error"] < 3e-2
    assert exports["int8"]["int8"]["top1_agreement"] >= 0.95
    assert "The ONNX files are opset 17 (ONNX Runtime 1.13 or later)." in (out / "README.md").read_text()
    verify_bundle(out)
    with pytest.raises(SystemExit, match="2"):  # argparse's exit, before any work
        main(["bundle", "nfnet_hub_nano", "--opset", "16", "--out", str(tmp_path / "b16")])
    assert "argument --opset: opset 16 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "b16").exists()


def test_the_cards_usage_code_runs_and_timm_and_the_runtime_agree(bundle, sample_images):
    """The card's two snippets, timm's and the torch-free runtime's, as a reader copies them: the same top five."""
    photo = eight_bit_photos(sample_images)[0]
    with_timm, with_runtime = run_card_code(bundle, "me/nano", photo)
    expected = OnnxClassifier.from_pretrained(bundle).predict(photo, top_k=5)[0]
    assert with_runtime.strip() == repr([expected])
    shown = [line.split("%  ") for line in with_timm.splitlines()]
    assert [label for _, label in shown] == [p.label for p in expected]
    assert [float(value) / 100 for value, _ in shown] == pytest.approx([p.probability for p in expected], abs=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_serve_answers_with_the_bundles_file_of_the_precision_asked(bundle, sample_images, precision):
    """FP32 pixels and encoded images in, whatever the file's own input type; the answers are that file's."""
    clf = OnnxClassifier.from_pretrained(bundle, filename=f"model_{precision}.onnx")
    photos = eight_bit_photos(sample_images)[:2]
    pixels = clf.preprocess.batch(photos)
    # ONNX Runtime's own thread count, as the classifier here has it: the same sums in the same order, on any CPU
    with Server(str(bundle), "--name", "nano", "--precision", precision, threads=False) as url:
        for sent in (dict(pixels=pixels), dict(images=tuple(p.read_bytes() for p in photos))):
            status, answer = infer(url, "nano", **sent)
            assert status == 200, answer
            np.testing.assert_allclose(np.reshape(answer["outputs"][0]["data"], (2, -1)), clf.logits(pixels),
                                       rtol=1e-5, atol=1e-6)


def test_local_dir_loads_in_timm_and_the_runtime(bundle, model):
    from nfnet_hub.runtime import OnnxClassifier

    loaded = timm.create_model(f"local-dir:{bundle}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    for name in (bundle, f"local-dir:{bundle}"):  # as timm names it too
        clf = OnnxClassifier.from_pretrained(name)
        assert clf.labels == LABELS
        np.testing.assert_allclose(clf.logits(x.numpy()), model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_non_square_model_is_bundled_at_its_size(sample_images, tmp_path):
    """timm trains and evaluates at a non-square --input-size (its eval transform then keeps the aspect ratio and
    fits the nearer side): the bundle, timm's local-dir model and the runtime keep that size and transform."""
    from timm.data import create_transform, resolve_data_config

    from nfnet_hub.preprocess import load_image
    from nfnet_hub.runtime import OnnxClassifier

    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=10), seed=3)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, 32, 64), "test_input_size": (3, 32, 64),
                            "crop_pct": 0.9, "crop_mode": "center"}
    calib = np.random.default_rng(0).standard_normal((10, 3, 32, 64)).astype(np.float32)
    out = build_bundle(model, tmp_path / "wide", label_names=LABELS, precisions=("fp32", "int8"), calibration=calib,
                       progress=False, force=True)
    assert "| Input size | 32x64 RGB, center crop_pct 0.9" in (out / "README.md").read_text()
    loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    transform = create_transform(**resolve_data_config(model=loaded), is_training=False)
    paths = sorted(sample_images.iterdir())
    x = torch.stack([transform(load_image(p)) for p in paths])
    assert x.shape[-2:] == (32, 64)
    with torch.no_grad():
        expected = model(x)
    clf = OnnxClassifier.from_pretrained(out)
    np.testing.assert_allclose(clf.logits(clf.preprocess.batch(paths)), expected.numpy(), rtol=1e-4, atol=1e-5)
    int8 = OnnxClassifier.from_pretrained(out, filename="model_int8.onnx")  # noise-calibrated: its shape only
    assert int8.logits(int8.preprocess.batch(paths)).shape == (len(paths), 10)


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "model.onnx").unlink(), "missing files: model.onnx"),
    (lambda d: (d / "notes.txt").write_text("x"), "unexpected files: notes.txt"),
    (lambda d: (d / "model.safetensors").write_bytes(b"tampered"), "model.safetensors does not match its checksum"),
    (lambda d: (d / "config.json").write_text(json.dumps({"architecture": 3})), "'architecture' must be a str"),
    (lambda d: (d / "model_int8.onnx").write_bytes(b"\x00corrupt"), "model_int8.onnx is not a valid ONNX model"),
    (lambda d: (d / "README.md").write_text("---\nlicense: [mit\n---\n# nano\n"),
     r"README.md \(edited since bundling\) has front matter the Hub refuses: while parsing a flow sequence"),
    (lambda d: (d / "README.md").write_bytes(b"# caf\xe9\n"), r"README.md \(edited since bundling\) is not UTF-8"),
    (lambda d: (d / "README.md").write_text("---\nlicense: My License\n---\n# nano\n"),
     r"front matter the Hub refuses: license 'My License' is not a license identifier the Hub takes"),
    (lambda d: (d / "export.json").write_text(json.dumps({"exports": [
        {"file": "model.onnx", "precision": "fp32", "max_rel_error": 0.5}]})), "parity 0.5 exceeds"),
])
def test_bad_bundles_are_refused_before_upload(bundle, tmp_path, damage, message):
    broken = _copy(bundle, tmp_path)
    damage(broken)
    with pytest.raises(BundleError, match=message):
        verify_bundle(broken)
    with HubStub() as hub:
        with pytest.raises(BundleError):
            publish(broken, "me/nano", endpoint=hub.url, token="hf_test")
        assert hub.requests == []  # nothing half-published


def test_publish_uploads_one_commit_and_verifies(bundle, capsys):
    token = "hf_VerySecretTokenValue"
    with HubStub() as hub:
        r = publish(bundle, "me/nano", endpoint=hub.url, token=token, private=True)
        commits = [p for m, p in hub.requests if m == "POST" and "/commit/" in p]
        assert len(commits) == 1 and r["verified"]
        assert hub.repos["me/nano"]["private"] is True
        stored = hub.files("me/nano")
        assert {n: hashlib.sha256(b).hexdigest() for n, b in stored.items()} == \
            {p.name: sha256(p) for p in bundle.iterdir()}
        assert all(h == f"Bearer {token}" for h in hub.auth_headers)
        pr = publish(bundle, "me/nano", endpoint=hub.url, token=token, create_pr=True)
        assert pr["pr_url"] and "refs/pr/1" in hub.repos["me/nano"]["refs"]
        dev = publish(bundle, "me/nano", endpoint=hub.url, token=token, revision="dev")
        assert hub.repos["me/nano"]["refs"]["dev"] == dev["commit"]
        publish(bundle, "me/public", endpoint=hub.url, token=token)
        commits = len(hub.repos["me/public"]["commits"])
        with pytest.raises(HubError, match=r"^me/public exists and is public, and --private does not change that: "
                                           "nothing was uploaded"):
            publish(bundle, "me/public", endpoint=hub.url, token=token, private=True)  # would stay public, silently
        assert len(hub.repos["me/public"]["commits"]) == commits
    assert token not in capsys.readouterr().out


def test_the_published_version_printed_pinned_is_the_one_predict_reads(bundle, sample_images, tmp_path):
    photo = str(eight_bit_photos(sample_images)[0])
    with HubStub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_x", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        cli = [sys.executable, "-m", "nfnet_hub.cli"]
        out = subprocess.run([*cli, "publish", str(bundle), "--repo-id", "me/nano"], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        pinned = out.stdout.split("this version, pinned: ")[1].split()[0]
        assert pinned == f"me/nano@{hub.repos['me/nano']['refs']['main']}"
        out = subprocess.run([*cli, "predict", photo, "--model", pinned, "--top-k", "1"], env=env,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    best = OnnxClassifier.from_pretrained(bundle).predict(photo, top_k=1)[0][0]
    assert out.stdout.splitlines() == [photo, f"  {best.probability:7.2%}  {best.label}"]


def test_a_hub_repository_without_the_onnx_file_says_what_it_lacks(bundle, sample_images, tmp_path):
    """A model timm saved on the Hub (config.json and weights: what timm's own repositories hold) is told how to
    bundle it; a repository without the precision asked for is told that (a 404 page's first line before)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from timm.models import save_for_hf

    save_for_hf(timm.create_model("nfnet_hub_nano", num_classes=10), tmp_path / "saved", safe_serialization=True)
    photo = str(eight_bit_photos(sample_images)[0])
    with HubStub() as hub:
        api = HfApi(endpoint=hub.url, token="hf_x")
        api.create_repo("me/saved")
        api.create_commit("me/saved", [CommitOperationAdd(p.name, str(p)) for p in (tmp_path / "saved").iterdir()],
                          commit_message="timm's save_for_hf")
        api.create_repo("me/fp32")  # an fp32 export with its config, no other precision
        api.create_commit("me/fp32", [CommitOperationAdd(n, str(bundle / n)) for n in ("config.json", "model.onnx")],
                          commit_message="fp32 only")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_x", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        runs = {args[-1]: subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "predict", photo, "--model", *args],
                                         env=env, capture_output=True, text=True, timeout=300)
                for args in (["me/saved"], ["me/fp32", "--precision", "fp16"])}
    assert runs["me/saved"].returncode == 2 and runs["me/saved"].stderr.endswith(
        "me/saved on the Hub has no model.onnx, so it is not an nfnet-hub bundle (a model timm saved?): bundle it "
        "first, `nfnet-hub bundle hf-hub:me/saved --out BUNDLE`\n")
    assert runs["fp16"].returncode == 2 and runs["fp16"].stderr.endswith(
        "me/fp32 on the Hub has no model_fp16.onnx: that precision was not published\n")


def test_a_bundle_published_to_another_repository_gets_a_card_that_names_it(bundle, tmp_path):
    """The card names the repository a bundle was built for (the quickstart's: YOUR-ORG/...); published elsewhere,
    the uploaded card names where it is, its checksums still hold, and the bundle folder is left as it is."""
    before = {p.name: sha256(p) for p in bundle.iterdir()}
    with HubStub() as hub:
        r = publish(bundle, "team/digits-v2", endpoint=hub.url, token="hf_x")
        stored = hub.files("team/digits-v2")
    assert r["verified"] and r["card_built_for"] == "me/nano"
    card = stored["README.md"].decode()
    assert "me/nano" not in card and "\n# digits-v2\n" in card
    assert 'timm.create_model("hf-hub:team/digits-v2"' in card and ModelCard(card).data.model_name == "team/digits-v2"
    assert card.replace("team/digits-v2", "me/nano").replace("# digits-v2", "# nano") == \
        (bundle / "README.md").read_text()  # nothing else changed
    for name, data in stored.items():
        (tmp_path / name).write_bytes(data)
    verify_bundle(tmp_path)  # its checksums hold
    assert {p.name: sha256(p) for p in bundle.iterdir()} == before


def test_a_card_edited_after_bundling_is_published_as_edited(bundle, tmp_path, capsys):
    """The model card is the one file a user edits before publishing (a description, intended uses): it goes up as
    edited with its new checksum; the weights, config and ONNX files must still match theirs."""
    edited = _copy(bundle, tmp_path)
    card = (edited / "README.md").read_text().replace("\n## ", "\n## Intended use\n\nReading digits.\n\n## ", 1)
    (edited / "README.md").write_text(card)
    assert verify_bundle(edited)["card_edited"] and not verify_bundle(bundle)["card_edited"]
    before = {p.name: sha256(p) for p in edited.iterdir()}
    with HubStub() as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_x", "HF_HUB_DISABLE_TELEMETRY": "1"}
        env.pop("HF_HUB_OFFLINE", None)
        out = subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "publish", str(edited), "--repo-id", "me/nano"],
                             env=env, capture_output=True, text=True, timeout=300)
        stored = hub.files("me/nano")
    assert out.returncode == 0, out.stderr
    assert "README.md was edited since the bundle was built" in out.stdout
    assert stored["README.md"].decode() == card
    for name, data in stored.items():
        (tmp_path / "hub" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "hub" / name).write_bytes(data)
    assert not verify_bundle(tmp_path / "hub")["card_edited"]  # the uploaded checksums hold the edited card's
    assert {p.name: sha256(p) for p in edited.iterdir()} == before  # the folder is left as it is


def test_predict_cli(bundle, sample_images, capsys):
    photos = [str(p) for p in sorted(sample_images.iterdir())[:2]]
    assert main(["predict", *photos, "--model", str(bundle), "--top-k", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == photos[0] and len(out) == 8
    out_one = out[:4]
    assert all(line.strip().split("%")[1].strip() in LABELS for line in out[1:4])
    assert main(["predict", str(sample_images), "--model", str(bundle), "--top-k", "1", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out.splitlines()  # a folder: its images, in order, in batches of 2
    assert out[::2] == [str(p) for p in sorted(sample_images.iterdir())] and len(out) > 4
    assert main(["predict", str(bundle / "config.json"), "--model", str(bundle)]) == 2
    assert "not a readable image" in capsys.readouterr().err
    assert main(["predict", photos[0], "--model", str(bundle / "model.onnx"), "--top-k", "3"]) == 0  # the file alone
    assert capsys.readouterr().out.splitlines() == out_one
    for precision in ("fp16", "int8"):  # chosen as serve chooses: the bundle's file of that precision
        assert main(["predict", photos[0], "--model", str(bundle), "--precision", precision, "--top-k", "3"]) == 0
        best = OnnxClassifier.from_pretrained(bundle, filename=f"model_{precision}.onnx").predict(photos[0], top_k=3)
        assert capsys.readouterr().out.splitlines() == [photos[0], *(f"  {p.probability:7.2%}  {p.label}"
                                                                     for p in best[0])]


def test_predict_skips_unreadable_images_names_them_and_exits_1(bundle, sample_images, tmp_path, capsys):
    """One broken file in a large folder costs its own line, not the run: the rest are predicted as they would be
    alone, and the exit status says that something was skipped."""
    photos = sorted(sample_images.iterdir())[:3]
    for p in photos:
        shutil.copy(p, tmp_path / p.name)
    (tmp_path / "b_broken.png").write_bytes(photos[0].read_bytes()[:200])
    assert main(["predict", str(tmp_path), "--model", str(bundle), "--top-k", "2"]) == 1
    out, err = capsys.readouterr()
    assert main(["predict", *map(str, photos), "--model", str(bundle), "--top-k", "2"]) == 0
    assert out.replace(str(tmp_path), str(sample_images)) == capsys.readouterr().out
    skipped, summary = err.splitlines()
    assert skipped.startswith(f"nfnet-hub predict: skipped {tmp_path / 'b_broken.png'} is not a readable image: ")
    assert summary == "nfnet-hub predict: 1 of 4 images skipped (unreadable or too large)"
    assert main(["predict", str(tmp_path / "b_broken.png"), str(bundle / "config.json"), "--model", str(bundle)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "nfnet-hub predict: error: none of the 2 images is readable"


def test_predict_takes_images_up_to_max_image_pixels_and_skips_larger_ones_undecoded(bundle, tmp_path, capsys):
    """Pillow's own check would warn from 89 Mpixels and refuse from 179 with no way round it; --max-image-pixels
    (default: where Pillow refuses) is the one limit, checked from the header before decoding."""
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (2000, 3000, 3), np.uint8)).save(photo)
    wide = tmp_path / "wide.png"  # 90 Mpixels of one grey: Pillow warns of a decompression bomb
    Image.new("L", (10_000, 9_000), 77).save(wide)
    clf = OnnxClassifier.from_pretrained(bundle)

    def shown(paths: list) -> list[str]:  # the same batches as the command's: results may differ across batch sizes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the library keeps Pillow's limit
            return [line for path, preds in zip(paths, clf.predict([str(p) for p in paths], top_k=2))
                    for line in (str(path), *(f"  {p.probability:7.2%}  {p.label}" for p in preds))]

    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning fails the test
        assert main(["predict", str(photo), str(wide), "--model", str(bundle), "--top-k", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == shown([photo, wide])
    assert Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's limit is the caller's again
    assert main(["predict", str(photo), str(wide), "--model", str(bundle), "--top-k", "2",
                 "--max-image-pixels", "6000000"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == shown([photo])  # exactly 6 Mpixels is taken
    assert err.splitlines() == [
        f"nfnet-hub predict: skipped {wide} is 10000x9000 (90,000,000 pixels), more than the 6,000,000 pixels an image "
        "may have here (--max-image-pixels raises the limit)",
        "nfnet-hub predict: 1 of 2 images skipped (unreadable or too large)"]
    assert main(["predict", str(photo), "--model", str(bundle), "--max-image-pixels", "5999999"]) == 2
    assert "photo.png is 3000x2000 (6,000,000 pixels), more than the 5,999,999" in capsys.readouterr().err


def test_predict_results_file_holds_what_the_runtime_predicts_in_each_format(bundle, sample_images, tmp_path, capsys):
    """timm inference.py's columns in CSV, records in JSON and JSON lines, each row the runtime's own prediction for
    its image; an unreadable image is left out (and named), an existing file kept unless --overwrite."""
    photos = sorted(sample_images.iterdir())[:3]
    folder = tmp_path / "photos"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    (folder / "b_broken.png").write_bytes(photos[0].read_bytes()[:200])
    names = [str(folder / p.name) for p in photos]
    expected = OnnxClassifier.from_pretrained(bundle).predict(names, top_k=3)
    records = [{"filename": n, "index": [p.index for p in ps], "label": [p.label for p in ps],
                "prob": [p.probability for p in ps]} for n, ps in zip(names, expected)]
    for suffix in (".csv", ".json", ".jsonl"):
        out = tmp_path / f"results{suffix}"
        assert main(["predict", str(folder), "--model", str(bundle), "--topk", "3", "--results-file", str(out)]) == 1
        stdout, err = capsys.readouterr()
        assert stdout == f"wrote 3 predictions to {out}\n" and "skipped" in err and "b_broken.png" in err
        text = out.read_text()
        if suffix == ".csv":
            rows = list(csv.DictReader(io.StringIO(text)))
            assert list(rows[0]) == ["filename", *(f"{c}_{i}" for c in ("index", "label", "prob") for i in range(3))]
            got = [{"filename": r["filename"], "index": [int(r[f"index_{i}"]) for i in range(3)],
                    "label": [r[f"label_{i}"] for i in range(3)], "prob": [float(r[f"prob_{i}"]) for i in range(3)]}
                   for r in rows]
        else:
            got = json.loads(text) if suffix == ".json" else [json.loads(line) for line in text.splitlines()]
        assert got == records, suffix
    before = out.read_bytes()
    assert main(["predict", names[0], "--model", str(bundle), "--results-file", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main(["predict", names[0], "--model", str(bundle), "--results-file", str(out), "--overwrite"]) == 0
    assert [json.loads(line)["filename"] for line in out.read_text().splitlines()] == names[:1]


def test_publish_cli_dry_run_and_bad_repo_ids(bundle, capsys):
    assert main(["publish", str(bundle), "--repo-id", "me/nano", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: would upload 8 files" in out and "one commit" in out
    for bad in ("nano", "me/nano/extra", "-me/nano", "me/"):
        assert main(["publish", str(bundle), f"--repo-id={bad}", "--dry-run"]) == 2
        assert "ORG/NAME" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def olah(tmp_path):
    """olah in offline mode, serving git repositories under ``mirrors/models/ORG/NAME``."""
    port = _free_port()
    (tmp_path / "olah.toml").write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nmirror-netloc = "127.0.0.1:{port}"\n'
        f'mirror-lfs-netloc = "127.0.0.1:{port}"\nrepos-path = "./repos"\nmirrors-path = ["./mirrors"]\n\n'
        '[accessibility]\noffline = true\n')
    proc = subprocess.Popen([sys.executable, "-m", "olah.server", "-c", "olah.toml"], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except urllib.error.HTTPError:
            break  # it answers
        except OSError:
            time.sleep(0.2)
    yield url, tmp_path / "mirrors" / "models"
    proc.terminate()
    proc.wait(timeout=30)


def test_round_trip_publish_then_download_through_olah(bundle, model, olah, sample_images, tmp_path):
    url, mirrors = olah
    with HubStub() as hub:
        publish(bundle, "me/nano", endpoint=hub.url, token="hf_x")
        uploaded = hub.files("me/nano")
    repo = mirrors / "me" / "nano"
    repo.mkdir(parents=True)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=repo, check=True)
    earlier = json.loads(uploaded["config.json"])  # tag v1: the same weights with other class names
    earlier["label_names"] = [label.upper() for label in LABELS]
    for name, data in {**uploaded, "config.json": json.dumps(earlier).encode()}.items():
        (repo / name).write_bytes(data)
    subprocess.run([*git, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "v1"], cwd=repo, check=True)
    subprocess.run(["git", "tag", "v1"], cwd=repo, check=True)
    v1 = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for name, data in uploaded.items():
        (repo / name).write_bytes(data)
    subprocess.run([*git, "commit", "-qam", "upload"], cwd=repo, check=True)

    script = """
import json, sys, numpy as np, torch
import nfnet_hub, timm
from huggingface_hub import snapshot_download
from nfnet_hub.runtime import OnnxClassifier
from nfnet_hub.hub import sha256
from pathlib import Path
local = Path(snapshot_download("me/nano", cache_dir=sys.argv[1]))
sums = {p.name: sha256(p) for p in local.iterdir() if p.is_file()}
model = timm.create_model("hf-hub:me/nano", pretrained=True).eval()
clf = OnnxClassifier.from_pretrained("me/nano", cache_dir=sys.argv[1])
prefixed = OnnxClassifier.from_pretrained("hf-hub:me/nano", cache_dir=sys.argv[1])  # as timm names it
pinned = {"timm": timm.create_model("hf-hub:me/nano@v1", pretrained=True).pretrained_cfg["label_names"],
          "name": OnnxClassifier.from_pretrained("hf-hub:me/nano@v1", cache_dir=sys.argv[1]).labels,
          "argument": OnnxClassifier.from_pretrained("me/nano", revision="v1", cache_dir=sys.argv[1]).labels}
x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
with torch.no_grad():
    torch_logits = model(x).numpy()
from nfnet_hub.serve.triton import write_repository
triton = write_repository("me/nano", sys.argv[2])  # through huggingface_hub's cache, as serve reads the Hub
pinned["triton"] = str(write_repository("hf-hub:me/nano@v1", sys.argv[2] + "-v1"))
print(json.dumps({"sums": sums, "timm": torch_logits.tolist(), "onnx": clf.logits(x.numpy()).tolist(),
                  "prefixed": prefixed.logits(x.numpy()).tolist(), "labels": clf.labels, "triton": str(triton),
                  "pinned": pinned}))
"""
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_ETAG_TIMEOUT": "30",
           "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_OFFLINE", None)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache"), str(tmp_path / "triton")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["sums"] == {p.name: sha256(p) for p in bundle.iterdir()}
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_array_equal(np.array(got["timm"], np.float32), expected)
    np.testing.assert_allclose(np.array(got["onnx"]), expected, rtol=1e-4, atol=1e-5)
    assert got["prefixed"] == got["onnx"]
    assert got["labels"] == LABELS
    pinned_triton = Path(got["pinned"].pop("triton"))
    assert got["pinned"] == {k: [label.upper() for label in LABELS] for k in ("timm", "name", "argument")}
    assert pinned_triton == tmp_path / "triton-v1" / "nano"
    assert (pinned_triton / "labels.txt").read_text().split("\n")[:-1] == [label.upper() for label in LABELS]
    triton = Path(got["triton"])
    assert triton == tmp_path / "triton" / "nano"  # named after the repository, as serve names it
    assert (triton / "labels.txt").read_text().splitlines() == LABELS
    assert (triton / "1" / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    # the CLI takes hf-hub: names as timm.create_model does
    export = subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "export", "hf-hub:me/nano", "--out",
                             str(tmp_path / "from-hub")], env={**env, "HF_HOME": str(tmp_path / "hf")},
                            capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr
    assert "weights: pretrained weights of hf-hub:me/nano" in export.stdout
    np.testing.assert_allclose(OnnxClassifier(tmp_path / "from-hub" / "model.onnx").logits(x.numpy()), expected,
                               rtol=1e-4, atol=1e-5)  # the repository's weights
    # nfnet-hub serve takes a repo id, through huggingface_hub's cache, pinned to a revision as timm pins it
    server = Server("hf-hub:me/nano@v1", env={**env, "HF_HOME": str(tmp_path / "hf-serve")})
    with server as url:
        client = InferenceServerClient(url.removeprefix("http://"))
        pixels = InferInput("pixel_values", [2, 3, 32, 32], "FP32")
        pixels.set_data_from_numpy(x.numpy())
        result = client.infer("nano", [pixels], parameters={"top_k": 1})
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-4, atol=1e-5)
        assert [row[0].decode() for row in result.as_numpy("labels")] == [LABELS[i].upper()
                                                                         for i in expected.argmax(1)]
        client.close()
    assert f"model nano: me/nano@v1 at commit {v1} (model.onnx" in server.output
    assert any((tmp_path / "hf-serve").rglob("model.onnx"))
    photo = str(eight_bit_photos(sample_images)[0])
    predicted = subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "predict", photo, "--model", "me/nano@v1",
                                "--top-k", "1"], env={**env, "HF_HOME": str(tmp_path / "hf-predict")},
                               capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert "CLASS " in predicted.stdout
