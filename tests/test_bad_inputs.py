"""Every command, given what users get wrong: one line that says what to do, exit 2, and nothing outside
the run's own output changed (the whole working folder is hashed before and after).

Each case runs ``nfnet-hub`` in a working folder holding a trained checkpoint, weights, a bundle,
labelled digit images and an unrelated file of the user's.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from serving import NO_TORCH, free_port

from nfnet_hub.cli import main
from nfnet_hub.errors import UsageError
from nfnet_hub.models.checkpoint import save_safetensors


@pytest.fixture(scope="module")
def workspace_template(trained_nano, nano_bundle, digits_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("template")
    run = Path(trained_nano["output"])
    shutil.copy(run / "last.pth.tar", root / "nano.pth.tar")
    save_safetensors(trained_nano["model"], root / "nano.safetensors")
    shutil.copytree(nano_bundle, root / "bundle")
    config = json.loads((nano_bundle / "config.json").read_text())  # bundles whose config.json was edited by hand
    labels = {**config, "label_names": ["a", "b", "c"], "pretrained_cfg": {**config["pretrained_cfg"],
                                                                           "label_names": ["a", "b", "c"]}}
    size = {**config, "pretrained_cfg": {**config["pretrained_cfg"], "input_size": [3, 64, 64],
                                         "test_input_size": [3, 64, 64]}}
    for name, edited in (("edited", labels), ("resized", size)):
        shutil.copytree(nano_bundle, root / name)
        (root / name / "config.json").write_text(json.dumps(edited))
    for label in ("3", "7"):
        shutil.copytree(digits_folders / "validation" / label, root / "images" / label)
    (root / "notes.txt").write_text("the user's own notes\n")
    (root / "empty.pth").write_bytes(b"")
    (root / "garbage.npz").write_bytes(b"\x00\x01 not an archive" * 10)
    (root / "garbage.bin").write_bytes(b"\x00\x01 not a checkpoint" * 10)
    (root / "noimages").mkdir()
    Image.new("1", (20_000, 20_000)).save(root / "bomb.png")  # 400 Mpixels in 50 kB: Pillow refuses to decode it
    (root / "labels3.txt").write_text("a\nb\nc\n")
    (root / "labels.csv").write_text("a,0\n")
    (root / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (root / "empty.txt").write_text("\n\n")
    (root / "bad.yaml").write_text("learning_rate: 3\n")
    (root / "bad.toml").write_text("this is = = not toml\n")
    (root / "release.toml").write_text('[[model]]\nrepo_id = "nope"\nmodel = "x"\ncolour = 1\n')
    tiny = root / "tiny"
    for split, n in (("train", 3), ("validation", 2)):
        (tiny / split / "1").mkdir(parents=True)
        for f in sorted((digits_folders / split / "1").iterdir())[:n]:
            shutil.copy(f, tiny / split / "1")
    shutil.copytree(digits_folders / "train" / "1", root / "trainonly" / "train" / "1")
    shutil.copytree(tiny, root / "strayclass")
    shutil.copytree(tiny / "validation" / "1", root / "strayclass" / "validation" / "9")
    shutil.copytree(tiny, root / "loose")
    shutil.copy(next((tiny / "train" / "1").iterdir()), root / "loose" / "train" / "stray.png")
    shutil.copytree(tiny / "validation", root / "heiconly" / "validation")
    (root / "heiconly" / "train" / "1").mkdir(parents=True)
    (root / "heiconly" / "train" / "1" / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    shutil.copytree(tiny, root / "hiddenclass")
    shutil.copytree(tiny / "train" / "1", root / "hiddenclass" / "train" / ".ipynb_checkpoints")
    shutil.copytree(tiny, root / "latin1class")  # a class folder named in Latin-1, as some zip tools leave them
    os.rename(root / "latin1class" / "train" / "1", os.fsencode(root / "latin1class" / "train") + b"/caf\xe9")
    shutil.copytree(tiny, root / "subfolder")
    shutil.copytree(tiny / "train" / "1", root / "subfolder" / "train" / "1" / "more")
    shutil.copytree(tiny / "validation", root / "samename" / "validation")
    for label in ("1", "7"):
        shutil.copytree(tiny / "train" / "1", root / "samename" / "train" / label / "2019")
    return root


@pytest.fixture
def ws(workspace_template, tmp_path, monkeypatch):
    root = tmp_path / "ws"
    shutil.copytree(workspace_template, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    (root / "home").mkdir()
    return root


def _snapshot(root: Path) -> dict[str, str]:
    state = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        # ONNX Runtime's device id (home/.cache/Microsoft/...), which a process's first import of it writes
        if rel == "home/.cache" or rel.startswith("home/.cache/Microsoft"):
            continue
        state[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return state


def _run(ws: Path, capsys, argv: list[str], output: str | None = None) -> tuple[int, str, str]:
    """Run the CLI; assert that nothing but ``output`` changed in the working folder."""
    before = _snapshot(ws)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own exits
        code = e.code
    out, err = capsys.readouterr()
    after = _snapshot(ws)
    if output is not None:
        before = {k: v for k, v in before.items() if not (k == output or k.startswith(output + "/"))}
        after = {k: v for k, v in after.items() if not (k == output or k.startswith(output + "/"))}
    assert after == before, "files outside the run's output changed"
    return code, out, err


NANO = ["nfnet_hub_nano", "--checkpoint", "nano.pth.tar"]
TINY_RUN = ["train", "--data-dir", "tiny", "--output", "runs", "--workers", "0", "--batch-size", "1"]  # starts at once
CASES = [
    # export
    ("export-img-size-0", ["export", *NANO, "--img-size", "0", "--out", "o"], "--img-size: must be a positive integer"),
    ("export-filename-escapes", ["export", *NANO, "--filename", "../x.onnx", "--out", "o"], "plain file name"),
    ("export-filename-suffix", ["export", *NANO, "--filename", "model.txt", "--out", "o"], "ending in .onnx"),
    ("export-opset-99", ["export", *NANO, "--opset", "99", "--out", "o"], "opset 99 is not supported"),
    ("export-opset-16", ["export", *NANO, "--opset", "16", "--out", "o"],
     r"opset 16 is not supported: choose one from 17 \(what ONNX Runtime 1.13 runs\) to \d+"),
    ("export-int8-no-calibration", ["export", *NANO, "--precision", "int8", "--out", "o"], "needs --calibration"),
    ("export-calibration-file", ["export", *NANO, "--precision", "int8", "--calibration", "notes.txt", "--out", "o"],
     "notes.txt is not a folder of images"),
    ("export-calibration-empty", ["export", *NANO, "--precision", "int8", "--calibration", "noimages", "--out", "o"],
     "no images"),
    ("export-empty-checkpoint", ["export", "nfnet_hub_nano", "--checkpoint", "empty.pth", "--out", "o"],
     r"empty\.pth is empty \(0 bytes\)"),
    ("export-garbage-checkpoint", ["export", "nfnet_hub_nano", "--checkpoint", "garbage.bin", "--out", "o"],
     "garbage.bin is not a checkpoint"),
    ("export-missing-checkpoint", ["export", "nfnet_hub_nano", "--checkpoint", "nope.pth", "--out", "o"],
     "nope.pth does not exist"),
    ("export-checkpoint-of-another-model", ["export", "nfnet_hub_f0", "--checkpoint", "nano.pth.tar", "--out", "o"],
     r"nano.pth.tar does not fit nfnet_hub_f0 \(its tensors are nfnet_hub_nano's: give that model name\): missing "
     r"\(\d+\)"),
    ("export-checkpoint-of-another-architecture",
     ["export", "dm_nfnet_f0", "--checkpoint", "nano_haiku.npz", "--out", "o"],
     "nano_haiku.npz does not fit dm_nfnet_f0: its model was built with ws=deepmind, act=gelu_tanh, which dm_nfnet_f0 "
     r"does not take \(its tensors are nfnet_hub_nano's: give that model name\)"),
    ("export-unknown-model", ["export", "nfnet_hub_f9", "--out", "o"],
     "unknown model 'nfnet_hub_f9'; nfnet-hub registers"),
    ("export-folder-as-model", ["export", "bundle", "--out", "o"], "name it local-dir:bundle"),
    ("export-hub-name-without-prefix", ["export", "me/nano", "--out", "o"], "a model on the Hub is hf-hub:me/nano"),
    ("export-unknown-tag", ["export", "nfnet_hub_f0.bogus", "--out", "o"],
     "has no pretrained tag 'bogus'; it has: dm_in1k, deepmind_in1k"),
    ("export-pretrained-without-weights", ["export", "nfnet_hub_nano", "--pretrained", "--out", "o"],
     r"nfnet_hub_nano has no weights to download: give them as a file \(--checkpoint FILE; train: --pretrained-path"),
    ("train-pretrained-without-weights", ["train", "--dataset", "digits", "--model", "nfnet_hub_nano", "--pretrained",
                                          "--output", "runs"], "nfnet_hub_nano has no weights to download"),
    ("export-pretrained-authors-tag", ["export", "nfnet_hub_f0.deepmind_in1k", "--pretrained", "--out", "o"],
     r"no weights to download \(these have: nfnet_hub_f0.dm_in1k\): .* converts with nfnet-hub convert deepmind"),
    ("export-out-under-a-file", ["export", *NANO, "--out", "notes.txt/sub"], "notes.txt is a file, not a folder"),
    ("export-not-our-file", ["export", *NANO, "--filename", "notes.onnx", "--out", "."], None),
    ("export-missing-labels", ["export", *NANO, "--labels", "nope.txt", "--out", "o"],
     "--labels nope.txt: no such file, nor an ImageNet subset"),
    ("export-label-count", ["export", *NANO, "--labels", "labels3.txt", "--out", "o"],
     "--labels labels3.txt names 3 classes, but the model has 10"),
    ("export-min-agreement", ["export", *NANO, "--min-agreement", "2", "--out", "o"],
     "must be a number between 0 and 1"),
    ("export-out-names-a-file", ["export", *NANO, "--out", "exports/nano.onnx"],
     "--out exports/nano.onnx names a file, but --out is the folder to write into: --out exports --filename nano.onnx"),
    ("export-bad-local-dir", ["export", "local-dir:nowhere", "--out", "o"], "local-dir:nowhere: no such folder"),
    # validate
    ("validate-folder-as-model", ["validate", "bundle/model.onnx", "--model", "bundle"], "name it local-dir:bundle"),
    ("validate-random-weights", ["validate", "bundle/model.onnx", "--model", "nfnet_hub_nano"],
     "no --checkpoint: comparing the export with a freshly initialised model says nothing"),
    ("validate-wrong-model", ["validate", "bundle/model.onnx", "--model", "nfnet_hub_f0", "--random-weights"],
     "has 10 classes, the model to compare with has 1000: give the --model and --checkpoint"),
    ("validate-missing-onnx", ["validate", "nope.onnx", *NANO[1:], "--model", "nfnet_hub_nano"],
     "no ONNX model at nope.onnx"),
    ("validate-not-onnx", ["validate", "notes.txt", "--model", "nfnet_hub_nano", "--checkpoint", "nano.pth.tar"],
     "notes.txt is not a loadable ONNX model"),
    ("validate-missing-images", ["validate", "bundle/model.onnx", "--model", "nfnet_hub_nano", "--checkpoint",
                                 "nano.pth.tar", "--images", "nope"], "nope is not a folder of images"),
    # train
    ("train-epochs-0", ["train", "--dataset", "digits", "--epochs", "0"],
     "--epochs: must be an integer of at least 1, got 0"),
    ("train-missing-data-dir", ["train", "--data-dir", "nope"], "--data-dir nope is not a folder"),
    ("train-no-data", ["train", "--dataset", ""], "no data: give --data-dir DIR"),
    # timm's train.py skips evaluation for an empty --val-split; here the split would be the data folder itself, and
    # the run would validate on its training images
    ("train-no-val-split", [*TINY_RUN, "--val-split", ""], r"argument --val-split: name the split: an empty name would "
     r"read the whole data folder as it \(timm's train.py takes an empty --val-split as no evaluation"),
    ("train-blank-train-split", [*TINY_RUN, "--train-split", " "], "argument --train-split: name the split"),
    ("train-data-dir-ignored-by-digits", ["train", "--dataset", "digits", "--data-dir", "images"],
     "--data-dir images and --dataset digits conflict"),
    ("train-no-train-split", ["train", "--data-dir", "images", "--output", "runs"],
     r"no 'train' split under images: .*; images holds class folders of images, as one split does: --data-dir names "
     r"the folder that holds the splits \(DIR/train/CLASS/... and DIR/validation/CLASS/...\)"),
    ("train-data-dir-is-the-train-split", ["train", "--data-dir", "trainonly/train", "--output", "runs"],
     r"no 'train' split under trainonly/train: .*; trainonly/train looks like a split itself: give the folder above "
     "it, --data-dir trainonly$"),
    ("train-no-validation-split", ["train", "--data-dir", "trainonly", "--output", "runs"],
     "no 'validation' split under trainonly"),
    ("train-validation-class-not-in-training", ["train", "--data-dir", "strayclass", "--output", "runs", "--workers",
                                               "0"], r"the validation split has 1 class\(es\) that the training "
     r"split lacks \(9\)"),
    ("train-mixup-with-an-odd-batch", ["train", "--dataset", "digits", "--mixup", "0.2", "--batch-size", "7"],
     "--batch-size 7: MixUp and CutMix pair the images of a batch, so it must be even"),
    ("train-unknown-mixup-mode", ["train", "--dataset", "digits", "--cutmix", "1", "--mixup-mode", "each"],
     "--mixup-mode 'each': choose batch, pair or elem"),
    ("train-num-classes-below-the-data", ["train", "--dataset", "digits", "--num-classes", "5"],
     r"--num-classes 5, but the training data have 10 classes \(0, 1, 2, .*\): give at least 10"),
    ("train-images-loose-in-the-split", ["train", "--data-dir", "loose", "--output", "runs", "--workers", "0"],
     r"images lie loose in the 'train' split's folder: put each one in a folder named after its class"),
    ("train-class-with-a-subfolder-of-images", ["train", "--data-dir", "subfolder", "--output", "runs", "--workers",
                                                "0"], r"train/1/more holds images inside train/1, which holds images "
     r"too: timm makes separate classes of them \('1' and 'more'\): keep each class's images in one folder"),
    ("train-class-folders-of-one-name", ["train", "--data-dir", "samename", "--output", "runs", "--workers", "0"],
     r"train/1/2019 and train/7/2019 would be one class, '2019': timm names a class by the last folder"),
    ("train-split-without-images", ["train", "--data-dir", "heiconly", "--output", "runs", "--workers", "0"],
     r"no images \(.jpg, .*\) in the class folders of heiconly/train; its folders hold 1 \(.heic\)"),
    ("train-class-map-naming-no-folder", ["train", "--data-dir", "tiny", "--class-map", "labels3.txt", "--output",
                                          "runs", "--workers", "0"],
     r"no images .* in the class folders of tiny/train that --class-map labels3.txt names; its folders hold 1 \(.png"),
    ("train-class-map-of-another-format", ["train", "--data-dir", "tiny", "--class-map", "labels.csv",
                                           "--output", "runs", "--workers", "0"],
     r"--class-map labels.csv: timm reads a class map from a .txt file \(one class name per line\) or a pickled"),
    ("train-class-map-not-text", ["train", "--data-dir", "tiny", "--class-map", "latin1.txt", "--output", "runs",
                                  "--workers", "0"], r"--class-map latin1.txt is not a text file \(UTF-8, or UTF-16"),
    ("train-class-map-empty", ["train", "--data-dir", "tiny", "--class-map", "empty.txt", "--output", "runs",
                               "--workers", "0"], r"--class-map empty.txt names no class \(one name per line\)"),
    ("train-aug-repeats-in-one-process", ["train", "--data-dir", "tiny", "--aug-repeats", "3", "--output", "runs",
                                          "--workers", "0"],
     r"--aug-repeats 3: timm repeats each image on other processes, so it needs a distributed run \(torchrun"),
    ("train-num-samples-of-a-folder", ["train", "--data-dir", "tiny", "--train-num-samples", "100", "--output", "runs",
                                       "--workers", "0"],
     r"--train-num-samples: timm sizes only a streamed dataset \(tfds/, wds/, hfids/\); an epoch of image folders"),
    ("train-pretrained-path-the-authors-npz", [*TINY_RUN, "--pretrained-path", "nano_haiku.npz"],
     "is the authors' Haiku checkpoint: convert it first, `nfnet-hub convert deepmind nano_haiku.npz --out "
     "nano_haiku.safetensors`, and give that file"),
    ("train-initial-checkpoint-of-other-classes", [*TINY_RUN, "--initial-checkpoint", "nano.safetensors",
                                                   "--num-classes", "2"],
     r"--initial-checkpoint nano.safetensors holds a classifier of 10 classes, this run's has 2: to fine-tune on "
     r"these classes, --pretrained-path nano.safetensors loads the rest"),
    ("train-unknown-optimizer", [*TINY_RUN, "--opt", "foo"], "--opt foo: Optimizer foo not found"),
    ("train-optimizer-kwarg", [*TINY_RUN, "--opt-kwargs", "foo=1"],
     r"--opt sgd with --opt-kwargs: SGD.__init__\(\) got an unexpected keyword argument 'foo'"),
    ("train-betas-of-another-count", [*TINY_RUN, "--opt", "adamw", "--opt-betas", "0.9"],
     "--opt-betas 0.9: --opt adamw takes 2 betas"),
    ("train-model-kwarg", [*TINY_RUN, "--model-kwargs", "foo=1"],
     "--model-kwargs foo=1: .* unexpected keyword argument"),
    ("train-model-kwarg-value", [*TINY_RUN, "--model", "nfnet_hub_nano", "--model-kwargs", "act=gelu_exact"],
     r"--model-kwargs act=gelu_exact: unknown activation 'gelu_exact': choose one of \['gelu', 'gelu_tanh'"),
    ("train-unknown-schedule", [*TINY_RUN, "--sched", "foo"], "--sched foo: Unknown scheduler 'foo'"),
    ("train-schedule-it-cannot-follow", [*TINY_RUN, "--sched", "wsd", "--epochs", "2"],
     "--sched wsd: wsd schedule requires 0 < decay_epochs <= epochs - warmup_epochs"),
    ("train-unknown-torchvision-dataset", ["train", "--dataset", "torch/foo", "--data-dir", "noimages", "--output",
                                           "runs"], "--dataset torch/foo, split 'train', under --data-dir noimages: "
                                                    "Unknown torchvision dataset foo"),
    ("train-torchvision-dataset-not-downloaded", ["train", "--dataset", "torch/cifar10", "--data-dir", "noimages",
                                                  "--output", "runs"],
     "Dataset not found or corrupted.*; --dataset-download lets torchvision download it there"),
    ("train-webdataset-without-the-split", ["train", "--dataset", "wds/shards", "--data-dir", "noimages", "--output",
                                            "runs"], "--dataset wds/shards, split 'train'.*: split train not found"),
    ("train-class-folder-not-utf8", ["train", "--data-dir", "latin1class", "--output", "runs", "--workers", "0"],
     r"class folders of the 'train' split are not named in UTF-8 \(caf\\xe9\): class names travel with the weights "
     r"into ONNX metadata and the Hub's config.json, which hold UTF-8 only: rename them \(convmv -f cp1252 -t utf-8 "
     r"-r --notest .*latin1class/train, or by hand\)"),
    ("train-hidden-class-folder", ["train", "--data-dir", "hiddenclass", "--output", "runs", "--workers", "0"],
     r"hidden folders of the 'train' split hold images and would be classes \(.ipynb_checkpoints\)"),
    ("export-checkpoint-is-a-bundle-folder", ["export", "nfnet_hub_nano", "--checkpoint", "bundle", "--out", "o"],
     "bundle is a folder, not a checkpoint file: give bundle/model.safetensors"),
    ("validate-onnx-is-a-bundle-folder", ["validate", "bundle", "--model", "nfnet_hub_nano", "--checkpoint",
                                          "nano.pth.tar"],
     "bundle is a folder, not an ONNX file: give bundle/model.onnx"),
    ("train-pretrained-path-is-a-folder", ["train", "--dataset", "digits", "--pretrained-path", "bundle"],
     "--pretrained-path bundle is a folder, not a checkpoint file: give bundle/model.safetensors"),
    ("train-fewer-images-than-a-batch", ["train", "--data-dir", "tiny", "--output", "runs", "--workers", "0"],
     "yields no full batch of 128"),
    ("train-missing-resume", ["train", "--dataset", "digits", "--resume", "nope.pth.tar"],
     "--resume nope.pth.tar: no such"),
    ("train-resume-weights", ["train", "--dataset", "digits", "--resume", "nano.safetensors"],
     "holds weights only, not a training checkpoint: .* --initial-checkpoint"),
    ("train-resume-finished-run", ["train", "--dataset", "digits", "--resume", "nano.pth.tar", "--epochs", "10",
                                   "--output", "runs"], r"nothing to train: .* pass --epochs N with N > 10"),
    ("train-resume-another-model", ["train", "--dataset", "digits", "--model", "nfnet_hub_nano", "--num-classes", "12",
                                    "--resume", "nano.pth.tar", "--epochs", "20", "--output", "runs"],
     r"--resume nano.pth.tar: its weights do not fit this run's model \(mis-shaped \(2\): head.fc.bias: .*\); "
     r"resume with the options of the run that wrote it \(--model nfnet_hub_nano, its args.yaml\)"),
    ("train-digits-not-square", ["train", "--dataset", "digits", "--input-size", "3", "32", "64"],
     "--input-size 3 32 64: --dataset digits trains at a square size"),
    ("train-image-mode-against-the-model", ["train", "--data-dir", "tiny", "--input-img-mode", "L", "--output", "runs",
                                            "--workers", "0"],
     r"--input-img-mode L reads 1-channel images, but the model takes 3 \(--in-chans, --input-size\)"),
    ("train-unknown-image-mode", ["train", "--data-dir", "tiny", "--input-img-mode", "rgb", "--output", "runs"],
     "--input-img-mode: 'rgb' is not an image mode: choose RGB"),
    ("train-four-channels-without-a-mode", ["train", "--data-dir", "tiny", "--in-chans", "4", "--output", "runs"],
     "the model takes 4-channel input, which images are not read as by default"),
    ("train-digits-two-channels", ["train", "--dataset", "digits", "--in-chans", "2", "--output", "runs"],
     "the model takes 2-channel input; the digits are greyscale, made 1 or 3 channels"),
    ("train-in-chans-against-input-size", ["train", "--data-dir", "tiny", "--in-chans", "1", "--input-size", "3", "32",
                                           "32", "--output", "runs"],
     "--in-chans 1 and --input-size 3 32 32 disagree: the first value of --input-size is the channel count"),
    ("train-into-an-earlier-run", ["train", "--dataset", "digits", "--model", "nfnet_hub_nano", "--output", "old"],
     r"old/nfnet_hub_nano-digits holds an earlier run \(last.pth.tar, summary.csv\): continue it with --resume auto"),
    ("train-resume-into-another-run", ["train", "--dataset", "digits", "--model", "nfnet_hub_nano", "--resume",
                                       "nano.pth.tar", "--epochs", "20", "--output", "old"],
     r"old/nfnet_hub_nano-digits holds another run \(last.pth.tar, summary.csv\), which resuming nano.pth.tar "
     r"would write over: go on in the checkpoint's own folder \(\.: name it"),
    ("train-resume-a-truncated-checkpoint", ["train", "--dataset", "digits", "--model", "nfnet_hub_nano", "--output",
                                             "old", "--resume", "auto"],
     r"old/nfnet_hub_nano-digits/last.pth.tar is truncated or not a PyTorch checkpoint; its folder also holds "
     r"checkpoint-4.pth.tar \(newest first\): --resume old/nfnet_hub_nano-digits/checkpoint-4.pth.tar goes on from"),
    ("train-into-a-run-that-saved-nothing", ["train", "--dataset", "digits", "--model", "nfnet_hub_nano", "--output",
                                             "old"], r"old/nfnet_hub_nano-digits holds the args.yaml of a run that "
     r"saved no checkpoint .*: start afresh in it with --resume auto"),
    ("train-missing-config", ["train", "--config", "nope"], "no config file 'nope' .recipes: f0, f1"),
    ("train-unknown-config-keys", ["train", "--config", "bad.yaml"], "unknown options learning_rate"),
    ("train-unknown-model", ["train", "--dataset", "digits", "--model", "resnet_nope", "--output", "runs"],
     "unknown model 'resnet_nope'"),
    ("train-missing-initial-checkpoint", ["train", "--dataset", "digits", "--initial-checkpoint", "nope.pth"],
     "--initial-checkpoint nope.pth: no such file"),
    ("train-output-under-a-file", ["train", "--dataset", "digits", "--output", "notes.txt/runs"],
     "notes.txt is a file"),
    # timm-train
    ("timm-train-bare", ["timm-train"], "the following arguments are required: script"),
    ("timm-train-missing-script", ["timm-train", "nope/train.py", "--model", "x"], "no such file: nope/train.py"),
    # bundle
    ("bundle-overwrite-a-folder-that-is-not-a-bundle", ["bundle", *NANO, "--out", "images", "--overwrite"],
     r"refusing to replace images: it is not a bundle \(it holds 3/, 7/"),
    ("bundle-overwrite-the-working-folder", ["bundle", *NANO, "--out", ".", "--overwrite"],
     "refusing to replace .: it is the working folder"),
    ("bundle-overwrite-a-parent", ["bundle", *NANO, "--out", "..", "--overwrite"], "it holds the working folder"),
    ("bundle-overwrite-home", ["bundle", *NANO, "--out", "home", "--overwrite"], "it is or holds the home folder"),
    ("bundle-overwrite-a-file", ["bundle", *NANO, "--out", "notes.txt", "--overwrite"], "it is a file"),
    ("bundle-license-not-an-identifier", ["bundle", *NANO, "--out", "b2", "--license", "My License"],
     "license 'My License' is not a license identifier the Hub takes: give one of its identifiers"),
    ("bundle-exists", ["bundle", *NANO, "--out", "bundle"], "bundle exists; pass --overwrite"),
    ("bundle-into-a-folder-not-a-bundle", ["bundle", *NANO, "--out", "images"],  # not "pass --overwrite", refused
     r"refusing to replace images: it is not a bundle \(it holds 3/, 7/,"),
    ("bundle-bad-repo-id", ["bundle", *NANO, "--repo-id", "me/a..b", "--out", "b2"], "not of the form ORG/NAME"),
    ("bundle-missing-metrics", ["bundle", *NANO, "--metrics", "nope.json", "--out", "b2"],
     "no metrics file at nope.json"),
    ("bundle-metrics-not-json", ["bundle", *NANO, "--metrics", "notes.txt", "--out", "b2"], "notes.txt is not JSON"),
    ("bundle-int8-no-calibration", ["bundle", *NANO, "--precision", "int8", "--out", "b2"], "needs --calibration"),
    ("bundle-img-size", ["bundle", *NANO, "--img-size", "-40", "--out", "b2"], "--img-size: must be a positive"),
    # publish
    ("publish-bad-repo-id", ["publish", "bundle", "--repo-id", "me/a..b", "--dry-run"], "not of the form ORG/NAME"),
    ("publish-not-a-bundle", ["publish", "images", "--repo-id", "me/x", "--dry-run"], "images failed verification"),
    ("publish-missing-folder", ["publish", "nope", "--repo-id", "me/x", "--dry-run"], "nope is not a bundle folder"),
    # release
    ("release-missing-manifest", ["release", "nope.toml", "--dry-run"], "no release manifest at nope.toml"),
    ("release-not-toml", ["release", "bad.toml", "--dry-run"], "bad.toml is not a TOML file"),
    ("release-bad-entries", ["release", "release.toml", "--dry-run"],
     "unknown keys colour; model 0: missing 'weights'"),
    # predict
    ("predict-mistyped-local-bundle", ["predict", "images/3/0000.png", "--model", "./bundel"],
     "no bundle folder or ONNX file at ./bundel"),
    ("predict-mistyped-nested-bundle", ["predict", "images/3/0000.png", "--model", "images/bundel"],
     "no bundle folder or ONNX file at images/bundel"),
    ("predict-a-model-name", ["predict", "images/3/0000.png", "--model", "nfnet_hub_nano"],
     r"no bundle folder or ONNX file at nfnet_hub_nano, nor is it a Hub repo id \(ORG/NAME\); a timm model name runs "
     r"here once exported: `nfnet-hub bundle NAME --checkpoint CKPT --out BUNDLE`, then give BUNDLE"),
    ("serve-a-pretrained-tag", ["serve", "nfnet_hub_f0.dm_in1k"],
     "no bundle folder or ONNX file at nfnet_hub_f0.dm_in1k, nor"),
    ("predict-timm-saved-folder", ["predict", "images/3/0000.png", "--model", "timmsaved"],
     r"timmsaved holds a model timm saved \(config.json and weights\), not an ONNX export: bundle it first, "
     r"`nfnet-hub bundle local-dir:timmsaved --out BUNDLE`"),
    ("serve-timm-saved-folder", ["serve", "timmsaved"], "timmsaved holds a model timm saved"),
    ("triton-timm-saved-folder", ["triton", "timmsaved", "--out", "repo"], "timmsaved holds a model timm saved"),
    # a training run, or a checkpoint, where an export or a model name belongs: the command that takes it
    ("predict-a-training-run", ["predict", "images/3/0000.png", "--model", "myrun"],
     r"myrun is a training run \(args.yaml and checkpoints\), not an ONNX export: bundle its best weights first, "
     r"`nfnet-hub bundle nfnet_hub_nano --checkpoint myrun/model_best.pth.tar --out BUNDLE`"),
    ("serve-a-checkpoint-file", ["serve", "nano.pth.tar"], r"nano.pth.tar holds weights, not an ONNX export: bundle "
     r"them first, `nfnet-hub bundle MODEL --checkpoint nano.pth.tar --out BUNDLE`"),
    ("triton-a-training-run", ["triton", "myrun", "--out", "repo"], r"myrun is a training run"),
    ("export-a-training-run-as-the-model", ["export", "myrun", "--out", "o"],
     r"unknown model 'myrun': that folder is a training run: give its model and its best checkpoint, "
     r"`nfnet_hub_nano --checkpoint myrun/model_best.pth.tar`"),
    ("train-a-checkpoint-as-the-model", ["train", "--dataset", "digits", "--model", "myrun/model_best.pth.tar"],
     r"that file holds weights: .*`nfnet_hub_nano --initial-checkpoint myrun/model_best.pth.tar`"),
    ("train-a-hub-id-without-hf-hub", ["train", "--dataset", "digits", "--model", "me/nano"],
     r"a model on the Hub is hf-hub:me/nano"),
    ("predict-not-an-image", ["predict", "notes.txt", "--model", "bundle"], "notes.txt is not a readable image"),
    ("predict-decompression-bomb", ["predict", "bomb.png", "--model", "bundle"],
     "bomb.png is 20000x20000 \\(400,000,000 pixels\\), more than the 178,956,970 pixels an image may have here "
     "\\(--max-image-pixels raises the limit\\)"),
    ("predict-missing-image", ["predict", "nope.png", "--model", "bundle"], "nope.png does not exist"),
    ("predict-url", ["predict", "https://example.com/cat.jpg", "--model", "bundle"],
     r"https://example.com/cat.jpg is a URL: images are read from files, bytes or arrays \(download it first"),
    ("predict-empty-folder", ["predict", "noimages", "--model", "bundle"], "no images .* under noimages"),
    ("predict-top-k-0", ["predict", "images/3/0000.png", "--model", "bundle", "--top-k", "0"],
     "--top-k/--topk: must be a positive integer"),
    ("predict-missing-file", ["predict", "images/3/0000.png", "--model", "bundle", "--filename", "model_fp16.onnx"],
     "holds no model_fp16.onnx"),
    ("predict-missing-precision", ["predict", "images/3/0000.png", "--model", "bundle", "--precision", "fp16"],
     r"bundle bundle has no fp16 model \(model_fp16.onnx\); it has: fp32, int8"),
    ("predict-file-and-precision", ["predict", "images/3/0000.png", "--model", "bundle", "--precision", "int8",
                                    "--filename", "model_int8.onnx"], "--filename and --precision both choose"),
    ("predict-bad-repo-id", ["predict", "images/3/0000.png", "--model", "me/a..b"],
     "neither a bundle folder nor a Hub"),
    ("predict-empty-revision", ["predict", "images/3/0000.png", "--model", "hf-hub:me/nano@"],
     r"'me/nano@' names no revision after '@': give ORG/NAME@REVISION \(a branch, tag or commit\)"),
    ("predict-labels-not-the-models", ["predict", "images/3/0000.png", "--model", "edited"],
     "model.onnx scores 10 classes, but its config names 3: the config is not the one exported with this model"),
    ("predict-size-not-the-models", ["predict", "images/3/0000.png", "--model", "resized"],
     "model.onnx takes 32x32 px, but its config's preprocessing gives 64x64 px: the config is not the one exported"),
    ("predict-results-file-suffix", ["predict", "images/3/0000.png", "--model", "bundle", "--results-file",
                                     "notes.txt"], "the suffix chooses the format, one of .csv, .json, .jsonl"),
    ("predict-results-file-is-a-folder", ["predict", "images/3/0000.png", "--model", "bundle", "--results-file",
                                          "noimages"], "noimages is a folder"),
    # convert
    ("convert-safetensors", ["convert", "deepmind", "nano.safetensors", "--model", "nfnet_hub_nano", "--out",
                             "x.safetensors"], "nano.safetensors is a safetensors checkpoint, not the authors'"),
    ("convert-garbage", ["convert", "deepmind", "garbage.npz", "--model", "nfnet_hub_nano", "--out", "x.safetensors"],
     "garbage.npz is not a checkpoint"),
    ("convert-out-suffix", ["convert", "deepmind", "garbage.npz", "--model", "nfnet_hub_nano", "--out", "x.pth"],
     "must be a .safetensors file"),
    ("convert-missing", ["convert", "deepmind", "nope.npz", "--model", "nfnet_hub_nano", "--out", "x.safetensors"],
     "nope.npz does not exist"),
    ("convert-out-exists", ["convert", "deepmind", "garbage.npz", "--model", "nfnet_hub_nano", "--out",
                            "nano.safetensors"], "nano.safetensors exists; pass --overwrite"),
    ("convert-another-variant", ["convert", "deepmind", "nano_haiku.npz", "--model", "nfnet_hub_f0", "--out",
                                 "x.safetensors"], "does not fit nfnet_hub_f0: it holds the authors' nfnet_hub_nano"),
    ("convert-into-timms-model", ["convert", "deepmind", "nano_haiku.npz", "--model", "dm_nfnet_f0", "--out",
                                  "x.safetensors"], "convert writes nfnet-hub's variants; nano_haiku.npz holds the "
     r"authors' nfnet_hub_nano \(give --model nfnet_hub_nano, or leave --model out\)"),
    ("convert-another-class-count", ["convert", "deepmind", "nano_haiku.npz", "--num-classes", "5", "--out",
                                     "x.safetensors"], "classifier has 10 classes, and convert keeps the authors' "
     "weights as they are; to fine-tune, convert without --num-classes and train with --pretrained-path x.safetensors "
     "--num-classes 5"),
    # quickstart, list, the command itself
    ("quickstart-epochs-0", ["quickstart", "--epochs", "0"], "--epochs: must be a positive integer"),
    ("quickstart-out-is-a-file", ["quickstart", "--out", "notes.txt"], "cannot write to notes.txt"),
    ("quickstart-bundle-folder-not-a-bundle", ["quickstart", "--out", "."], None),
    ("quickstart-a-run-of-the-users-in-its-runs-folder", ["quickstart", "--out", "quick"],
     r"quick/runs/nano-digits holds a run the quickstart did not make, where it writes its own: choose another --out"),
    ("quickstart-digits-folder-of-the-users", ["quickstart", "--out", "project"],  # it wrote over 0000.png ...
     r"project/digits holds files the quickstart did not write \(train/3/0000.png, train/3/mine.png\), where it "
     r"writes the digits: choose another --out"),
    ("list-unknown-option", ["list", "--bogus"], "unrecognized arguments: --bogus"),
    ("unknown-command", ["bogus"], "invalid choice: 'bogus'"),
]
def _earlier_run(ws: Path) -> None:
    (ws / "old" / "nfnet_hub_nano-digits").mkdir(parents=True)
    shutil.copy(ws / "nano.pth.tar", ws / "old" / "nfnet_hub_nano-digits" / "last.pth.tar")
    (ws / "old" / "nfnet_hub_nano-digits" / "summary.csv").write_text("epoch,train_loss\n0,2.3\n")


def _truncated_run(ws: Path) -> None:
    """A run whose last.pth.tar was cut short (a full disk, a copy interrupted); its checkpoint-4 is whole."""
    _earlier_run(ws)
    run = ws / "old" / "nfnet_hub_nano-digits"
    shutil.copy(run / "last.pth.tar", run / "checkpoint-4.pth.tar")
    (run / "last.pth.tar").write_bytes((run / "last.pth.tar").read_bytes()[:100_000])


def _users_digits(ws: Path) -> None:
    """A project of the user's with its own digits folder (an image named as the quickstart names its first
    training 3, another, and a Finder .DS_Store, which is left alone)."""
    (ws / "project" / "digits" / "train" / "3").mkdir(parents=True)
    for name in ("0000.png", "mine.png"):
        shutil.copy(ws / "images" / "7" / "0000.png", ws / "project" / "digits" / "train" / "3" / name)
    (ws / "project" / "digits" / ".DS_Store").write_bytes(b"\0")


def _users_run_in_the_quickstarts_folder(ws: Path) -> None:
    """A run of the user's where the quickstart keeps its own (trained with --output quick/runs --experiment
    nano-digits): a rerun deleted its checkpoints."""
    (ws / "quick" / "runs" / "nano-digits").mkdir(parents=True)
    shutil.copy(ws / "nano.pth.tar", ws / "quick" / "runs" / "nano-digits" / "model_best.pth.tar")
    (ws / "quick" / "runs" / "nano-digits" / "args.yaml").write_text("model: nfnet_hub_f0\ndataset: ''\n")


def _run_without_checkpoint(ws: Path) -> None:
    (ws / "old" / "nfnet_hub_nano-digits").mkdir(parents=True)
    (ws / "old" / "nfnet_hub_nano-digits" / "args.yaml").write_text("model: nfnet_hub_nano\n")


def _training_run(ws: Path) -> None:
    (ws / "myrun").mkdir()
    (ws / "myrun" / "args.yaml").write_text("model: nfnet_hub_nano\nepochs: 10\n")
    shutil.copy(ws / "nano.pth.tar", ws / "myrun" / "model_best.pth.tar")


def _timm_saved(ws: Path) -> None:
    """A folder as timm's save_for_hf leaves it: config.json and weights, no ONNX."""
    (ws / "timmsaved").mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(ws / "bundle" / name, ws / "timmsaved" / name)


def _authors_nano(ws: Path) -> None:
    from test_deepmind import authors_params, write_npz

    from nfnet_hub.models.variants import VARIANTS

    v = VARIANTS["nano"]
    write_npz(authors_params(v.widths, v.depths, 10, v.group_size, v.stem_channels[:3]), ws / "nano_haiku.npz")


SPECIAL = {"export-not-our-file": lambda ws: (ws / "notes.onnx").write_text("mine"),
           **dict.fromkeys(("convert-another-variant", "convert-into-timms-model", "convert-another-class-count",
                            "train-pretrained-path-the-authors-npz", "export-checkpoint-of-another-architecture"),
                           _authors_nano),
           "predict-timm-saved-folder": _timm_saved, "serve-timm-saved-folder": _timm_saved,
           "triton-timm-saved-folder": _timm_saved,
           "train-into-an-earlier-run": _earlier_run, "train-resume-into-another-run": _earlier_run,
           "train-into-a-run-that-saved-nothing": _run_without_checkpoint,
           "train-resume-a-truncated-checkpoint": _truncated_run,
           "quickstart-digits-folder-of-the-users": _users_digits,
           "quickstart-a-run-of-the-users-in-its-runs-folder": _users_run_in_the_quickstarts_folder,
           **dict.fromkeys(("predict-a-training-run", "triton-a-training-run", "export-a-training-run-as-the-model",
                            "train-a-checkpoint-as-the-model"), _training_run)}
MESSAGES = {
    "export-not-our-file": "notes.onnx exists and was not written by nfnet-hub",
    "quickstart-bundle-folder-not-a-bundle": "refusing to replace bundle: it is not a bundle",
}


def test_the_battery_is_large_and_covers_every_command():
    commands = {argv[0] for _, argv, _ in CASES}
    assert len(CASES) >= 50
    assert commands >= {"export", "validate", "train", "bundle", "publish", "release", "predict", "convert",
                        "timm-train", "quickstart", "list"}


@pytest.mark.parametrize("name,argv,message", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_and_changes_nothing(ws, capsys, name, argv, message, monkeypatch):
    if name == "quickstart-bundle-folder-not-a-bundle":  # a folder named bundle, holding the user's own files
        monkeypatch.chdir(ws / "home")
        (ws / "home" / "bundle").mkdir()
        (ws / "home" / "bundle" / "mine.txt").write_text("keep me")
    elif name in SPECIAL:
        SPECIAL[name](ws)
    message = message or MESSAGES[name]
    output = {"export": "o", "bundle": "b2", "train": "runs"}.get(argv[0])
    code, out, err = _run(ws, capsys, argv, output)
    command = argv[0] if argv[0] not in ("bogus",) else ""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith(f"nfnet-hub {command}".rstrip() + ": error: "), err
    import re

    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in out + err and "weights_only=False" not in out + err
    if output:
        assert not (ws / output).exists() or name.startswith("train-")  # no partial output


def test_debug_shows_the_traceback(ws, capsys, monkeypatch):
    with pytest.raises(UsageError, match="plain file name"):
        main(["export", *NANO, "--filename", "../x.onnx", "--out", "o", "--debug"])
    monkeypatch.setenv("NFNET_HUB_DEBUG", "1")
    with pytest.raises(UsageError, match="plain file name"):
        main(["export", *NANO, "--filename", "../x.onnx", "--out", "o"])


def test_a_system_error_without_a_message_still_says_what_it_is(ws):
    """timm's validate.py raises a bare FileNotFoundError for a missing checkpoint (it logs the path first)."""
    (ws / "fails.py").write_text("raise FileNotFoundError()\n")
    # a process of its own: timm-train patches timm's AGC, which other tests compare ours with
    p = subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "timm-train", "fails.py"], capture_output=True,
                       text=True)
    assert p.returncode == 1 and p.stderr.strip() == \
        "nfnet-hub timm-train: error: FileNotFoundError (run with --debug for the traceback)", p.stderr


@pytest.mark.parametrize("missing,argv,needs", [
    ("onnxruntime", ["predict", "images", "--model", "bundle"],
     'ONNX Runtime, which is not installed: pip install "nfnet-hub[cpu]" (or "nfnet-hub[gpu]" for onnxruntime-gpu'),
    ("kserve", ["serve", "bundle"], 'the server\'s packages, which are not installed: pip install "nfnet-hub[serve]"'),
    ("prometheus_client", ["serve", "bundle"], "the server's packages"),  # the first that "nfnet-hub[cpu]" lacks
    # Triton's gRPC messages, read only for --grpc-port: said before the server starts
    ("tritonclient", ["serve", "bundle", "--port", str(free_port()), "--grpc-port", str(free_port())],
     "the server's packages"),
    ("torch", ["export", *NANO, "--out", "o"], "torch, which this installation lacks (the serving installation"),
    ("PIL", ["predict", "images", "--model", "bundle"], None),
], ids=["no-onnxruntime", "no-kserve", "no-prometheus-client", "no-tritonclient", "torch-free", "a-bug"])
def test_a_package_the_installation_lacks_is_named_with_what_installs_it(ws, missing, argv, needs):
    """`pip install nfnet-hub` without an ONNX Runtime extra, or the torch-free serving image, running a command that
    needs what it lacks. Stand-in: the package is hidden from the import system (None in sys.modules). Any other
    missing module (here Pillow, which every installation has) is a bug and keeps its traceback."""
    code = f"import sys; sys.modules[{missing!r}] = None; from nfnet_hub.cli import main; sys.exit(main())"
    p = subprocess.run([sys.executable, "-c", code, *argv], cwd=ws, capture_output=True, text=True, timeout=120)
    if needs is None:
        assert p.returncode == 1 and "Traceback" in p.stderr and "ModuleNotFoundError" in p.stderr, p.stderr
    else:
        assert p.returncode == 2 and p.stderr.startswith(f"nfnet-hub {argv[0]}: error: this command needs {needs}")
        assert p.stderr.count("\n") == 1, p.stderr


def test_a_bundle_listing_a_missing_file_is_refused_before_upload(ws, capsys):
    (ws / "bundle" / "model_int8.onnx").unlink()
    code, _, err = _run(ws, capsys, ["publish", "bundle", "--repo-id", "me/x", "--dry-run"])
    assert code == 2 and "checksums.sha256 lists files that are missing: model_int8.onnx" in err


def test_overwrite_replaces_a_bundle_and_nothing_else(ws, capsys):
    code, out, err = _run(ws, capsys, ["bundle", *NANO, "--out", "bundle", "--overwrite"], output="bundle")
    assert code == 0, err
    assert "preprocessing: 32x32 px, squash crop 1, bicubic, mean (0.27, 0.27, 0.27)" in out
    assert "from the data config recorded in nano.pth.tar" in out
    assert sorted(p.name for p in (ws / "bundle").iterdir()) == ["README.md", "checksums.sha256", "config.json",
                                                                 "export.json", "model.onnx", "model.safetensors"]
    assert not [p for p in ws.iterdir() if "partial" in p.name]


def test_the_publish_command_printed_for_a_folder_with_a_space_runs_as_pasted(ws, capsys):
    code, out, err = _run(ws, capsys, ["bundle", *NANO, "--out", "my bundle", "--repo-id", "me/x"], output="my bundle")
    assert code == 0, err
    command = shlex.split(out.split("publish with: ")[1])
    assert command[:3] == ["nfnet-hub", "publish", "my bundle"]
    code, out, err = _run(ws, capsys, [*command[1:], "--dry-run"])
    assert code == 0 and "dry run" in out, err


def _cli(args: list[str], cwd: Path, torch_free: bool = False, **kw) -> subprocess.Popen:
    """The command in a process of its own; ``torch_free``: with torch hidden, as a serving image lacks it."""
    start = ["-c", NO_TORCH] if torch_free else ["-m", "nfnet_hub.cli"]
    return subprocess.Popen([sys.executable, *start, *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_publish_without_a_network_is_one_line_and_never_shows_the_token(ws):
    """Publishing and reading a Hub name need no torch (a second, not ten, to start on 2 cores)."""
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_VerySecretTokenValue",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    p = _cli(["publish", "bundle", "--repo-id", "me/nano"], ws, torch_free=True, env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2, err
    assert err.strip().splitlines() == [err.strip()] and "cannot reach the Hub at http://127.0.0.1:9" in err
    assert "hf_VerySecretTokenValue" not in out + err
    for command in (["publish", "bundle", "--repo-id", "me/nano"], ["predict", "images/3/0000.png", "--model", "me/x"]):
        p = _cli(command, ws, torch_free=True,
                 env={**env, "HF_ENDPOINT": "http://me:hf_InTheEndpoint@127.0.0.1:9"})  # a mirror's
        out, err = p.communicate(timeout=120)
        assert p.returncode == 2 and "cannot reach the Hub at http://***@127.0.0.1:9" in err, err
        assert "hf_InTheEndpoint" not in out + err
    # predict downloads, which huggingface_hub retries (five times, some 23 s): one line says so, not ten (the
    # seconds are its back-off's, checked against the waits it makes in the test below)
    assert re.fullmatch(r"downloading me/x: the Hub at http://\*\*\*@127\.0\.0\.1:9 did not answer \(\[Errno 111\] "
                        r"Connection refused\); huggingface_hub retries for up to \d+ s \(Ctrl-C stops it\)",
                        err.strip().splitlines()[0]), err
    assert len(err.strip().splitlines()) == 2, err



@pytest.mark.parametrize("answer", [503, None])  # an HTTP status, or a port nothing listens on
def test_a_hub_that_fails_is_retried_in_one_line_and_the_error_says_what_it_answered(answer, tmp_path, caplog,
                                                                                     monkeypatch):
    """huggingface_hub's real download against a loopback server, its back-off waits recorded, not slept. Its log
    records are filtered where they are made, so an application's own log handlers get the one line too: here
    pytest's, with huggingface_hub's own handler taken away as its docs advise an application that logs (filters on
    that handler left the endpoint's token in every retry line)."""
    import http.server
    import logging
    import socket
    import threading

    from huggingface_hub import hf_hub_download

    from nfnet_hub.errors import HubError
    from nfnet_hub.hubclient import hub_errors

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(answer)
            self.end_headers()

        def log_message(self, *args):
            pass

    if answer:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    waits = []
    monkeypatch.setattr("huggingface_hub.utils._http.time.sleep", waits.append)
    monkeypatch.setattr(logging.getLogger("huggingface_hub"), "handlers", [])
    endpoint = f"http://me:hf_InTheEndpoint@127.0.0.1:{port}"
    with pytest.raises(HubError) as e, hub_errors("downloading me/x", endpoint):
        hf_hub_download("me/x", "config.json", endpoint=endpoint, cache_dir=tmp_path)
    if answer:
        server.shutdown()
    where = f"http://***@127.0.0.1:{port}"
    said = "answered HTTP 503" if answer else "did not answer ([Errno 111] Connection refused)"
    assert "hf_InTheEndpoint" not in caplog.text
    assert [r.getMessage() for r in caplog.records] == [
        f"downloading me/x: the Hub at {where} {said}; huggingface_hub retries for up to {sum(waits):.0f} s "
        "(Ctrl-C stops it)"]
    assert str(e.value) == (
        f"downloading me/x: the Hub at {where} answered HTTP 503 and nothing is cached (the Hub is down or limits "
        "your requests: try again later)" if answer else
        f"downloading me/x: cannot reach the Hub at {where} (ConnectError: [Errno 111] Connection refused) and "
        "nothing is cached (check your network, HF_ENDPOINT and HF_HUB_OFFLINE)")


def test_a_huggingface_hub_whose_back_off_names_its_settings_otherwise_gets_a_retry_line_without_seconds(
        monkeypatch):
    from nfnet_hub.hubclient import _retry_seconds

    assert re.fullmatch(r" for up to \d+ s", _retry_seconds())  # huggingface_hub's figure: 23 s in 2.4
    monkeypatch.setattr("huggingface_hub.utils.http_backoff", lambda method, url, *, retries=3, **kwargs: None)
    assert _retry_seconds() == ""


def test_a_hub_name_under_hf_hub_offline_says_the_cache_lacks_it_at_once(ws, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    p = _cli(["predict", "images/3/0000.png", "--model", "me/nano"], ws, env=env)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.strip().splitlines() == [
        "nfnet-hub predict: error: downloading me/nano: HF_HUB_OFFLINE is set and huggingface_hub's cache does not "
        "hold it (unset HF_HUB_OFFLINE to download it)"], err

def test_file_names_in_another_encoding_are_printed_and_written_as_their_bytes(ws):
    """A Latin-1 name (as an old zip leaves it) under a terminal whose encoding is strict UTF-8 (Python's default
    outside the C locale) is printed as ls prints it; a CSV results file holds its bytes, JSON its escape, so both
    give back a path that opens."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict"}
    folder = os.fsencode(ws / "latin1class" / "train")
    run = [sys.executable, "-m", "nfnet_hub.cli", "predict", folder, "--model", "bundle", "--top-k", "1"]
    out = subprocess.run(run, cwd=ws, env=env, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == folder + b"/caf\xe9/" + sorted(os.listdir(folder + b"/caf\xe9"))[0]
    for suffix in ("csv", "json"):
        out = subprocess.run([*run, "--results-file", f"latin1.{suffix}"], cwd=ws, env=env, capture_output=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
    with open(ws / "latin1.csv", newline="", encoding="utf-8", errors="surrogateescape") as f:
        from_csv = [row["filename"] for row in csv.DictReader(f)]
    from_json = [r["filename"] for r in json.loads((ws / "latin1.json").read_text())]
    assert from_csv == from_json and len(from_csv) == 3 and all(os.path.isfile(n) for n in from_csv)


def test_a_reader_that_leaves_early_ends_the_command_quietly(ws):
    """`nfnet-hub predict folder | head`: a closed pipe stops the command as it stops Unix tools (status 141, no
    message), not with an error about the pipe."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    p = subprocess.Popen([sys.executable, "-m", "nfnet_hub.cli", "predict", "images", "--model", "bundle"], cwd=ws,
                         stdout=write_end, stderr=subprocess.PIPE, text=True)
    os.close(write_end)
    _, err = p.communicate(timeout=120)
    assert (p.returncode, err) == (141, "")


def test_ctrl_c_prints_one_line_exits_130_and_leaves_nothing_partial(ws):
    def as_at_a_terminal():  # a test runner started in the background passes SIGINT on ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = _cli(["quickstart", "--out", "qs", "--no-progress"], ws, start_new_session=True, preexec_fn=as_at_a_terminal)
    deadline = time.time() + 120
    while not (ws / "qs" / "runs").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # inside the training loop
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == ["nfnet-hub quickstart: interrupted"]
    assert out.splitlines()[:2] == [  # the imports' seconds are said, not silent
        "loading torch, timm and scikit-learn's digits ...",
        "1/4 training nfnet_hub_nano on scikit-learn's digits (10 epochs, AGC clipping 0.02) ..."], out
    assert not [f for f in (ws / "qs").rglob("*") if f.name.startswith(".")]  # no partial or temporary files


def test_partial_files_of_killed_runs_are_swept_and_those_of_live_runs_kept(ws, capsys):
    import socket

    from nfnet_hub.files import partial_path

    (ws / "o").mkdir()
    host = partial_path(ws / "o" / "model.onnx").name.split(".")[-1]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = ws / "o" / f".model.onnx.nfnet-hub-partial.{int(dead.stdout)}.00ff00ff.{host}"
    stale_dir = ws / "o" / f".bundle.nfnet-hub-partial.{int(dead.stdout)}.00ff00fe.{host}"
    live = ws / "o" / f".model.onnx.nfnet-hub-partial.{os.getpid()}.00ff00fd.{host}"
    other_host = ws / "o" / f".model.onnx.nfnet-hub-partial.{int(dead.stdout)}.00ff00fc.not-{socket.gethostname()}"
    for f in (stale, live, other_host):
        f.write_bytes(b"partial")
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_bytes(b"partial")
    assert main(["export", *NANO, "--out", "o"]) == 0
    assert f"removed {Path('o') / stale.name}: a partial file left by an interrupted run" in capsys.readouterr().out
    assert not stale.exists() and not stale_dir.exists() and live.exists() and other_host.exists()


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_files_we_write_honour_the_umask(ws, capsys, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        assert main(["bundle", *NANO, "--out", "b2"]) == 0
        assert main(["export", *NANO, "--out", "o"]) == 0
    finally:
        os.umask(old)
    for f in [*(ws / "b2").iterdir(), ws / "o" / "model.onnx"]:
        assert f.stat().st_mode & 0o777 == file_mode, f
    assert (ws / "b2").stat().st_mode & 0o777 == dir_mode


def test_resumed_run_with_more_epochs_extends_its_schedule(ws, capsys):
    """timm's train.py stretches the schedule to the new --epochs; restoring the finished one trains at lr 0."""
    ckpt = torch.load(ws / "nano.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 9  # the last finished (timm's layout)
    args = ["train", "--dataset", "digits", "--resume", "nano.pth.tar", "--epochs", "11", "--batch-size", "64",
            "--lr", "0.2", "--clip-grad", "0.02", "--clip-mode", "agc", "--warmup-epochs", "1", "--no-progress",
            "--log-interval", "0", "--output", "runs", "--experiment", "more", "--checkpoint-hist", "0"]
    code, out, err = _run(ws, capsys, args, output="runs")
    assert code == 0, err
    assert "the schedule now runs to epoch 11 (the checkpoint's run was for 10)" in out
    summary = (ws / "runs" / "more" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and summary[1].startswith("10,")
    after = torch.load(ws / "runs" / "more" / "last.pth.tar", weights_only=True)
    moved = max(float((after["state_dict"][k] - v).abs().max()) for k, v in ckpt["state_dict"].items())
    assert after["epoch"] == 10 and moved > 1e-4  # it learned: the weights moved


def test_a_run_that_validates_on_its_training_split_says_so(ws, capsys):
    code, out, err = _run(ws, capsys, [*TINY_RUN, "--val-split", "train", "--epochs", "1", "--no-progress",
                                       "--img-size", "32", "--experiment", "same"], output="runs")
    assert code == 0, err
    assert f"note: both splits are {Path('tiny') / 'train'}: validation measures the images the run trains on" in out
    code, out, err = _run(ws, capsys, [*TINY_RUN, "--epochs", "1", "--no-progress", "--img-size", "32",
                                       "--experiment", "apart"], output="runs")
    assert code == 0 and "both splits" not in out, err


def test_overwrite_refusal_names_what_is_there_and_keeps_it(ws, capsys):
    (ws / "mine").mkdir()
    (ws / "mine" / "thesis.tex").write_text("years of work")
    code, _, err = _run(ws, capsys, ["bundle", *NANO, "--out", "mine", "--overwrite"])
    assert code == 2 and "it holds thesis.tex" in err
    assert (ws / "mine" / "thesis.tex").read_text() == "years of work"


def test_validate_says_which_preprocessing_it_used(ws, capsys):
    code, out, err = _run(ws, capsys, ["validate", "bundle/model_int8.onnx", *["--model", "nfnet_hub_nano"],
                                       "--checkpoint", "nano.pth.tar", "--images", "images"])
    assert code == 0, err
    assert "preprocessing (from model_int8.onnx's metadata): 32x32 px, squash crop 1, bicubic" in out
    report = json.loads(out[out.index("{"):])
    assert report["inputs"] == len(list((ws / "images").rglob("*.png"))) and report["torch_accuracy"] > 90
    assert report["accuracy_note"] is None
    (ws / "images" / "misc").mkdir()
    shutil.copy(next((ws / "images" / "3").iterdir()), ws / "images" / "misc")
    code, out, err = _run(ws, capsys, ["validate", "bundle/model_int8.onnx", *["--model", "nfnet_hub_nano"],
                                       "--checkpoint", "nano.pth.tar", "--images", "images"])
    report = json.loads(out[out.index("{"):])
    assert code == 0 and report["torch_accuracy"] is None
    assert report["accuracy_note"].startswith(f"no accuracy: 1 of {report['inputs']} images are in folders not named "
                                              "after a label (misc)")
    shutil.rmtree(ws / "images" / "misc")


def test_validate_leaves_out_an_unreadable_image_and_says_so(ws, capsys):
    """One broken file in a validation set of thousands: scored on the rest (as training skips it), said, exit 1."""
    args = ["validate", "bundle/model_int8.onnx", "--model", "nfnet_hub_nano", "--checkpoint", "nano.pth.tar",
            "--images", "images"]
    code, out, _ = _run(ws, capsys, args)
    whole = json.loads(out[out.index("{"):])
    (ws / "images" / "3" / "broken.png").write_bytes(b"\x89PNG not really")
    code, out, err = _run(ws, capsys, args)
    report = json.loads(out[out.index("{"):])
    assert code == 1 and err.splitlines()[-1] == f"nfnet-hub validate: 1 of {whole['inputs'] + 1} images left out " \
                                                  "(unreadable)"  # after the progress lines
    assert report["unreadable"] == ["images/3/broken.png is not a readable image: cannot identify image file "
                                    "'images/3/broken.png'"]
    assert {k: v for k, v in report.items() if k != "unreadable"} == {k: v for k, v in whole.items()
                                                                    if k != "unreadable"}
    (ws / "images" / "3" / "broken.png").unlink()


def test_version_is_the_installed_distributions():
    from importlib.metadata import version

    out = subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "--version"], capture_output=True, text=True)
    assert (out.returncode, out.stdout) == (0, f"nfnet-hub {version('nfnet-hub')}\n")


def test_every_option_has_help_that_shows_its_default():
    import argparse

    from nfnet_hub.cli import build_parser

    _, parsers = build_parser()
    assert set(parsers) == {"train", "timm-train", "list", "convert", "export", "validate", "bundle", "publish",
                            "release", "predict", "quickstart", "serve", "triton"}
    for name, parser in parsers.items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"nfnet-hub {name} {action.dest}: no help"
            if action.option_strings and not action.required:
                shown = formatter._get_help_string(action)
                assert "%(default)" in shown or "(default:" in shown, f"nfnet-hub {name} {action.dest}"
