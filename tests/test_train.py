"""The trainer on real data (scikit-learn's digits): accuracy, torchrun/DDP over gloo, resumption."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import built_once
from PIL import Image

from nfnet_hub.train import TrainingDiverged, parse_args, train
from nfnet_hub.train.data import digits_split

BASE = ["--model", "nfnet_hub_nano", "--dataset", "digits", "--no-progress", "--log-interval", "0",
        "--clip-grad", "0.02", "--clip-mode", "agc", "--warmup-epochs", "1", "--workers", "0"]


def _cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    """A training process; one thread each, as the tests run two at a time (two processes of two spinning
    threads each on two cores run ten times slower)."""
    return subprocess.Popen([sys.executable, "-m", "nfnet_hub.cli", "train", *args],
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _torchrun(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "nfnet_hub.cli", "train", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


# a run that checkpoints every 4 steps, in two epochs of 22 steps: interrupted in its first epoch, it resumes
INTERRUPTIBLE = [*BASE, "--epochs", "2", "--batch-size", "64", "--lr", "0.2", "--recovery-interval", "4",
                 "--checkpoint-hist", "0", "--experiment", "run"]
STEPS = 2 * (1437 // 64)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory) -> Path:
    """The last checkpoint of an INTERRUPTIBLE run left alone, where each interrupted one must end: run once."""
    def run(folder: Path) -> None:
        out, _ = (p := _cli(*INTERRUPTIBLE, "--output", str(folder))).communicate(timeout=600)
        assert p.returncode == 0, out

    return built_once(tmp_path_factory, "uninterrupted", run) / "run" / "last.pth.tar"


def _assert_same_final_state(ref_ckpt: Path, ckpt: Path) -> None:
    """The interrupted run ends exactly where the uninterrupted one ends."""
    a, b = _weights(ref_ckpt), _weights(ckpt)
    assert a["global_step"] == b["global_step"] == STEPS
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(sb["momentum_buffer"], sa["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_nano_learns_digits(trained_nano):
    """The suite's shared run (conftest.trained_nano): accuracy, timm's output layout, the data config."""
    assert trained_nano["metrics"]["top1"] >= 95.0
    out = Path(trained_nano["output"])
    assert {"args.yaml", "summary.csv", "last.pth.tar", "model_best.pth.tar"} <= {p.name for p in out.iterdir()}
    assert len(list(out.glob("checkpoint-*.pth.tar"))) == 3
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr" and len(rows) == 11
    ckpt = _weights(out / "last.pth.tar")
    assert {"state_dict", "state_dict_ema", "optimizer", "epoch", "version", "arch", "args", "global_step"} <= set(ckpt)
    assert ckpt["epoch"] == 9 and ckpt["version"] == 2  # timm's layout: the last finished epoch
    expected = {"input_size": [3, 32, 32], "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bicubic",
                "mean": [0.27] * 3, "std": [0.38] * 3, "label_names": [str(i) for i in range(10)]}
    assert ckpt["data_config"] == expected
    assert yaml.safe_load((out / "args.yaml").read_text())["data_config"] == expected


@pytest.mark.parametrize("mode", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_match_one_with_the_same_global_batch(tmp_path, mode):
    common = [*BASE, "--epochs", "1", "--lr", "0.1", "--drop", "0", "--drop-path", "0", "--checkpoint-hist", "0",
              "--model-ema", "--model-ema-decay", "0.9"]
    one = _cli(*common, "--batch-size", "64", "--output", str(tmp_path / "one"), "--experiment", "run")
    two = _torchrun(*common, *mode, "--batch-size", "32", "--output", str(tmp_path / "two"), "--experiment", "run")
    for p in (one, two):
        out, _ = p.communicate(timeout=600)
        assert p.returncode == 0, out
    a, b = _weights(tmp_path / "one/run/last.pth.tar"), _weights(tmp_path / "two/run/last.pth.tar")
    assert a["global_step"] == b["global_step"] == 1437 // 64
    for weights in ("state_dict", "state_dict_ema"):
        for k, v in a[weights].items():
            torch.testing.assert_close(b[weights][k], v, rtol=1e-4, atol=1e-5, msg=f"{weights}: {k}")
    moved = sum(float((v - b["state_dict"][k]).abs().max()) for k, v in a["state_dict"].items())
    assert moved < 1e-2


def test_fsdp_run_resumes_with_its_shards_optimiser_and_ema(tmp_path):
    """Sharded weights, momentum and EMA are gathered into the checkpoint and re-sharded on resume."""
    common = [*BASE, "--epochs", "2", "--lr", "0.1", "--batch-size", "64", "--fsdp", "--model-ema",
              "--model-ema-decay", "0.9", "--checkpoint-hist", "2", "--output", str(tmp_path)]
    reference = _torchrun(*common, "--experiment", "ref")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out
    resumed = _torchrun(*common, "--experiment", "resumed", "--resume", str(tmp_path / "ref/checkpoint-0.pth.tar"))
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resumed from" in out, out
    a, b = _weights(tmp_path / "ref/last.pth.tar"), _weights(tmp_path / "resumed/last.pth.tar")
    assert a["global_step"] == b["global_step"] == 2 * (1437 // 128)
    for weights in ("state_dict", "state_dict_ema"):
        assert a[weights].keys() == b[weights].keys()
        for k, v in a[weights].items():
            torch.testing.assert_close(b[weights][k], v, rtol=1e-5, atol=1e-6, msg=f"{weights}: {k}")
    momenta = a["optimizer"]["state"]
    assert len(momenta) == len(a["state_dict"])  # every parameter, by name, unsharded
    for k, v in momenta.items():
        assert v["momentum_buffer"].shape == a["state_dict"][k].shape
        torch.testing.assert_close(b["optimizer"]["state"][k]["momentum_buffer"], v["momentum_buffer"], rtol=1e-5,
                                   atol=1e-6, msg=k)


def test_killed_run_resumes_to_the_same_state(tmp_path, uninterrupted):
    victim = _cli(*INTERRUPTIBLE, "--output", str(tmp_path / "victim"))
    ckpt = tmp_path / "victim/run/last.pth.tar"
    deadline = time.time() + 300
    while not ckpt.exists() and victim.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _weights(ckpt)["global_step"]
    assert 0 < killed_at < STEPS
    # under torchrun --max-restarts, a restarted worker sees TORCHELASTIC_RESTART_COUNT and resumes by itself
    resumed = _cli(*INTERRUPTIBLE, "--output", str(tmp_path / "victim"), env={"TORCHELASTIC_RESTART_COUNT": "1"})
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and f"step {killed_at}" in out, out
    _assert_same_final_state(uninterrupted, ckpt)


def test_a_run_that_only_warms_up_says_so(tmp_path, capsys):
    train(parse_args([*BASE, "--epochs", "1", "--batch-size", "256", "--output", str(tmp_path)]))
    assert "warning: --warmup-epochs 1 covers all 1 epochs" in capsys.readouterr().out


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path):
    args = parse_args([*BASE, "--epochs", "2", "--batch-size", "64", "--lr", "1e9", "--clip-grad", "0",
                       "--recovery-interval", "1", "--output", str(tmp_path), "--experiment", "run"])
    with pytest.raises(TrainingDiverged, match="the loss became nan by epoch"):
        train(args)
    ckpt = _weights(tmp_path / "run/last.pth.tar")
    assert ckpt["global_step"] >= 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_compiled_training_writes_the_bare_models_checkpoint(tmp_path):
    """--torchcompile wraps the model; the checkpoint must still load into a plain timm model."""
    import timm

    result = train(parse_args([*BASE, "--epochs", "1", "--batch-size", "64", "--torchcompile", "eager",
                               "--output", str(tmp_path), "--experiment", "run"]))
    ckpt = _weights(tmp_path / "run/last.pth.tar")
    fresh = timm.create_model("nfnet_hub_nano", num_classes=10)
    fresh.load_state_dict(ckpt["state_dict"])  # strict: no "_orig_mod." prefixes
    for k, v in result["model"].state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)


def test_recipes_follow_the_authors(tmp_path, capsys):
    args = parse_args(["--config", "f3", "--batch-size", "512"])
    assert (args.model, args.opt, args.momentum, args.weight_decay) == ("nfnet_hub_f3", "sgd", 0.9, 2e-5)
    assert (args.lr_base, args.lr_base_size, args.sched, args.warmup_epochs) == (0.1, 256, "cosine", 5)
    assert args.sched_on_updates  # the authors' schedule moves every step
    assert (args.epochs, args.clip_mode, args.smoothing) == (360, "agc", 0.1)
    assert (args.drop, args.drop_path, args.aa) == (0.4, 0.25, "rand-m15-n4")
    assert (args.mixup, args.cutmix, args.mixup_mode, args.mixup_switch_prob) == (0.2, 1.0, "elem", 0.5)
    assert args.train_interpolation == "bicubic"  # the authors resize training crops bicubically
    assert args.img_size == 320 and args.model_ema and args.model_ema_decay == 0.99999 and args.batch_size == 512
    (tmp_path / "bad.yaml").write_text("learning_rate: 3\nstop_epoch: null\n")
    with pytest.raises(ValueError, match="unknown options learning_rate=3 .nfnet-hub train knows every option"):
        parse_args(["--config", str(tmp_path / "bad.yaml")])
    # a newer train.py's options left unset (null, false, empty) mean nothing to do: ignored, and said so
    (tmp_path / "newer.yaml").write_text("lr: 0.3\nstop_epoch: null\nsave_epochs: []\nsome_flag: false\n")
    args = parse_args(["--config", str(tmp_path / "newer.yaml")])
    assert args.lr == 0.3 and not hasattr(args, "stop_epoch")
    assert "note: " + str(tmp_path / "newer.yaml") + ": save_epochs, some_flag, stop_epoch: not options" in \
        capsys.readouterr().out
    with pytest.raises(ValueError, match="recipes: f0, f1"):
        parse_args(["--config", "f9"])


def _digit_images() -> dict[str, list[tuple[Image.Image, int]]]:
    xtr, xte, ytr, yte = digits_split()
    return {split: [(Image.fromarray(x).resize((32, 32)), int(y)) for x, y in zip(xs[:n], ys[:n])]
            for split, xs, ys, n in (("train", xtr, ytr, 256), ("validation", xte, yte, 64))}


def _as_folders(root: Path, splits) -> list[str]:
    for split, items in splits.items():
        for i, (image, label) in enumerate(items):
            folder = root / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    return ["--dataset", "", "--data-dir", str(root)]


def _as_hf_parquet(root: Path, splits) -> list[str]:
    """The Hub's layout of an image dataset (data/<split>-*.parquet), read by datasets.load_dataset."""
    import datasets

    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"digit{i}" for i in range(10)])})
    for split, items in splits.items():
        columns = {"image": [image for image, _ in items], "label": [label for _, label in items]}
        datasets.Dataset.from_dict(columns, features=features).to_parquet(root / f"data/{split}-00000-of-00001.parquet")
    return ["--dataset", f"hfds/{root}", "--data-dir", str(root / "cache")]


def _as_webdataset(root: Path, splits) -> list[str]:
    """Tar shards of png + cls samples and timm's _info.json split description."""
    import webdataset

    root.mkdir(parents=True)
    info = {"name": "digits", "splits": {}}
    for split, items in splits.items():
        names, lengths = [f"{split}-{shard:06d}.tar" for shard in range(2)], []
        for shard, name in enumerate(names):
            part = items[shard::2]
            with webdataset.TarWriter(str(root / name)) as sink:
                for i, (image, label) in enumerate(part):
                    png = io.BytesIO()
                    image.save(png, format="PNG")
                    sink.write({"__key__": f"{shard}_{i:05d}", "png": png.getvalue(), "cls": label})
            lengths.append(len(part))
        info["splits"][split] = {"name": split, "num_samples": sum(lengths), "filenames": names,
                                 "shard_lengths": lengths}
    (root / "_info.json").write_text(json.dumps(info))
    return ["--dataset", "wds/digits", "--data-dir", str(root), "--num-classes", "10"]


def _as_torchvision_mnist(root: Path, splits) -> list[str]:
    """MNIST's files (idx format, as torchvision unpacks them), read by torchvision's MNIST in greyscale: the model
    takes RGB, as train.py's --dataset torch/mnist gives it by default."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split, prefix in (("train", "train"), ("validation", "t10k")):
        pixels = np.stack([np.asarray(image) for image, _ in splits[split]])
        labels = np.array([label for _, label in splits[split]], np.uint8)
        for name, arr, magic in (("images-idx3", pixels, 0x803), ("labels-idx1", labels, 0x801)):
            (raw / f"{prefix}-{name}-ubyte").write_bytes(struct.pack(f">I{arr.ndim}I", magic, *arr.shape)
                                                          + arr.tobytes())
    return ["--dataset", "torch/mnist", "--data-dir", str(root)]


@pytest.mark.parametrize("source", [_as_folders, _as_hf_parquet, _as_webdataset, _as_torchvision_mnist],
                         ids=["folders", "hfds", "wds", "torchvision"])
def test_timms_data_sources_feed_the_trainer(tmp_path, monkeypatch, source):
    """Image folders, a Hugging Face dataset (offline, from its parquet files), webdataset shards and a torchvision
    dataset, through timm's datasets, transforms and loaders."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = source(tmp_path / "data", _digit_images())
    result = train(parse_args([*BASE, *data, "--img-size", "32", "--epochs", "8", "--batch-size", "32",
                               "--lr", "0.2", "--workers", "0", "--aa", "rand-m3-n1", "--scale", "0.7", "1.0",
                               "--hflip", "0", "--output", str(tmp_path / "out")]))
    assert result["global_step"] == 8 * (256 // 32)
    assert result["model"].num_classes == 10
    assert result["metrics"]["top1"] > 40.0  # learns from timm's pipeline (chance: 10%)


def test_a_source_that_names_no_classes_asks_for_num_classes(tmp_path):
    data = _as_webdataset(tmp_path / "data", _digit_images())[:-2]
    with pytest.raises(ValueError, match="pass --num-classes"):
        train(parse_args([*BASE, *data, "--img-size", "32", "--workers", "0", "--output", str(tmp_path / "out")]))


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None, reason="tensorflow is installed here")
def test_a_source_whose_package_is_missing_says_what_to_install(tmp_path):
    with pytest.raises(ValueError, match="tfds/mnist needs the Python package tensorflow, which is not installed: "
                                         "pip install tensorflow tensorflow-datasets"):
        train(parse_args([*BASE, "--dataset", "tfds/mnist", "--data-dir", str(tmp_path), "--output", str(tmp_path)]))


def test_torchrun_restarts_a_killed_worker_which_resumes_by_itself(tmp_path, uninterrupted):
    agent = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                              "--max-restarts", "1", "-m", "nfnet_hub.cli", "train", *INTERRUPTIBLE,
                              "--output", str(tmp_path / "elastic")], env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = tmp_path / "elastic/run/last.pth.tar"
    deadline = time.time() + 300
    while not ckpt.exists() and agent.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent.pid)], capture_output=True, text=True)
    pids = [int(p) for p in workers.stdout.split()]
    assert pids, "no worker to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, _ = agent.communicate(timeout=600)
    assert agent.returncode == 0 and "resumed from" in out, out
    _assert_same_final_state(uninterrupted, ckpt)


def test_images_that_do_not_decode_are_skipped_by_name(digits_folders, tmp_path, caplog):
    """timm's dataset skips a sample whose reading raises OSError, and stopped the run on any other error of Pillow's
    (a decompression bomb: an image of more pixels than Pillow decodes). Every one is skipped and named, a truncated
    file too (it fails while timm decodes it, and timm's warning gives its index only)."""
    for split, labels in (("train", ("1", "7")), ("validation", ("1",))):
        for label in labels:
            (tmp_path / split / label).mkdir(parents=True)
            for f in sorted((digits_folders / split / label).iterdir())[:16]:
                (tmp_path / split / label / f.name).write_bytes(f.read_bytes())
    bomb = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(bomb, "PNG")  # 400 Mpixels: Pillow refuses it before decoding
    named = {"train/1/bomb.png": bomb.getvalue(), "train/7/notes.png": b"the user's notes\n",
             "validation/1/bomb.png": bomb.getvalue()}
    for name, data in named.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "train/7/cut.png").write_bytes((tmp_path / "train/7/0000.png").read_bytes()[:60])
    with caplog.at_level("WARNING"):
        result = train(parse_args([*BASE, "--dataset", "", "--data-dir", str(tmp_path), "--img-size", "32",
                                   "--epochs", "1", "--batch-size", "5", "--output", str(tmp_path / "out")]))
    assert result["global_step"] == 35 // 5
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Skipped sample")]
    # a skip reads the next sample, which may be skipped in its turn: a file can be named more than once
    assert any(m.endswith(f"image file is truncated ({tmp_path / 'train/7/cut.png'})") for m in skipped), skipped
    for name in named:
        assert any(f"{tmp_path / name} is not a readable image" in m for m in skipped), (name, skipped)


def test_a_class_map_that_leaves_folders_out_says_so(digits_folders, tmp_path, capsys):
    """timm reads only the folders a --class-map names (a subset of classes, or a misspelt name): the folders left
    out and the classes without images are noted, and the model has the map's classes."""
    for split in ("train", "validation"):
        for label in ("1", "7", "9"):
            (tmp_path / split / label).mkdir(parents=True)
            for f in sorted((digits_folders / split / label).iterdir())[:8]:
                (tmp_path / split / label / f.name).write_bytes(f.read_bytes())
    (tmp_path / "map.txt").write_bytes("1\r\n7\r\nnine\r\n".encode("utf-8-sig"))  # Notepad's: 1 is read, not ﻿1
    result = train(parse_args([*BASE, "--dataset", "", "--data-dir", str(tmp_path), "--class-map",
                               str(tmp_path / "map.txt"), "--img-size", "32", "--epochs", "1", "--batch-size", "4",
                               "--output", str(tmp_path / "out")]))
    out = capsys.readouterr().out
    assert result["model"].num_classes == 3 and result["global_step"] == 16 // 4
    for split in ("train", "validation"):
        assert (f"note: --class-map {tmp_path / 'map.txt'} names no class of 1 folder(s) of {split}/, whose 8 images "
                f"are left out: {split}/9 (8)") in out
        assert f"note: --class-map {tmp_path / 'map.txt'} names 1 class(es) with no images in {split}/: nine" in out
