"""nfnet-hub train speaks timm's train.py: its args.yaml, its options and defaults, its checkpoints both
ways, fine-tuning; and the optimiser step in the order the project promises."""
from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from conftest import randomise
from PIL import Image
from timm.models import resume_checkpoint
from timm.scheduler import MultiStepLRScheduler
from timm.utils import CheckpointSaver

from nfnet_hub.agc import adaptive_clip_grad_
from nfnet_hub.cli import main
from nfnet_hub.train import loop, parse_args, train
from nfnet_hub.train.build import build, create_ema, learning_rate, setup_device
from nfnet_hub.train.folders import count_classes
from nfnet_hub.train.loop import optimizer_step
from nfnet_hub.train.values import check_ranges

FIXTURE = Path(__file__).parent / "fixtures" / "timm-train-args.yaml"  # written by timm's own train.py
# the command line that wrote it (timm's train.py, main branch, timm 1.0.x)
COMMAND = ["--model", "nfnet_hub_nano", "--dataset", "digits", "--epochs", "1", "--batch-size", "64", "--lr", "0.2",
           "--clip-grad", "0.02", "--clip-mode", "agc"]
QUICK = ["--dataset", "digits", "--model", "nfnet_hub_nano", "--workers", "0", "--no-progress", "--log-interval", "0",
         "--batch-size", "64", "--warmup-epochs", "0"]


def test_timms_args_yaml_is_accepted_as_is_and_resolves_to_the_same_run():
    written = yaml.safe_load(FIXTURE.read_text())
    from_yaml, from_command = vars(parse_args(["--config", str(FIXTURE)])), vars(parse_args(COMMAND))
    assert set(written) <= set(from_yaml)  # every key of train.py's 172 is known
    assert {k: v for k, v in from_yaml.items() if k != "config"} == {k: v for k, v in from_command.items()
                                                                     if k != "config"}
    for key, value in written.items():  # and the defaults are train.py's own
        assert from_yaml[key] == value, key


def test_a_config_saved_in_utf16_is_read(tmp_path):
    """PowerShell's Out-File writes UTF-16 with a byte-order mark."""
    (tmp_path / "args.yaml").write_text(FIXTURE.read_text(), encoding="utf-16")
    assert vars(parse_args(["--config", str(tmp_path / "args.yaml")])) == vars(parse_args(["--config", str(FIXTURE)])) \
        | {"config": str(tmp_path / "args.yaml")}


def test_defaults_are_train_pys(tmp_path):
    args = parse_args([])
    assert (args.clip_mode, args.amp_dtype, args.epochs, args.warmup_epochs, args.checkpoint_hist, args.workers,
            args.drop, args.dataset) == ("norm", "float16", 300, 5, 10, 4, 0.0, "")
    f0 = parse_args(["--config", "f0"])  # nfnet-hub's own choices live in the recipes
    assert (f0.clip_mode, f0.clip_grad, f0.amp_dtype, f0.drop, f0.aa) == ("agc", 0.01, "bfloat16", 0.2, "rand-m5-n4")


def test_on_cuda_cudnn_picks_its_fastest_convolutions_and_matmuls_run_in_tf32_as_in_train_py(monkeypatch):
    """Without them our trainer ran at 0.87x train.py's speed on an H200 (1010 against 1164 images/s)."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul  # set by hand: monkeypatch cannot undo matmul's
    before = cudnn.benchmark, matmul.allow_tf32
    try:
        cudnn.benchmark = matmul.allow_tf32 = False
        assert setup_device(parse_args(["--device", "cpu"]))[2].type == "cpu"
        assert (cudnn.benchmark, matmul.allow_tf32) == (False, False)  # CPU runs: untouched
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a stand-in: this machine has no GPU
        assert setup_device(parse_args([]))[2] == torch.device("cuda", 0)
        assert (cudnn.benchmark, matmul.allow_tf32) == (True, True)
    finally:
        cudnn.benchmark, matmul.allow_tf32 = before


def test_options_nfnet_hub_does_not_implement_are_refused_by_name_before_any_work(tmp_path, capsys):
    code = main(["train", *QUICK, "--tta", "2", "--naflex-loader", "--kd-model-name", "resnet18",
                 "--output", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and "3 option(s) of timm's train.py that nfnet-hub train does not implement" in err[0]
    assert [line.split(":")[0].strip() for line in err[1:]] == ["--tta 2", "--naflex-loader True",
                                                                "--kd-model-name 'resnet18'"]
    assert not list(tmp_path.iterdir())



def test_values_out_of_range_are_refused_by_name_before_any_work(tmp_path, capsys):
    """train.py takes them, then fails in a timm assertion or torch (--mean of two values, --smoothing 1.5,
    --color-jitter -0.4, --drop 1.5) or trains on nonsense (--std 0: NaN; --scale max min)."""
    code = main(["train", *QUICK, "--data-dir", str(tmp_path), "--dataset", "", "--mean", "0.5", "0.5", "--std", "0",
                 "--drop", "1.5", "--smoothing", "1", "--color-jitter", "-0.4", "--scale", "0.9", "0.1",
                 "--weight-decay", "-1", "--hflip", "0.5", "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0] == "nfnet-hub train: error: 7 option value(s) out of range:", err
    assert [line.strip() for line in err[1:]] == [
        "--drop 1.5: must be a probability, 0 to 1", "--smoothing 1.0: must be at least 0 and below 1",
        "--color-jitter -0.4: must be 0 or more", "--weight-decay -1.0: must be 0 or more",
        "--std 0.0: must be above 0 (pixels are divided by it)",
        "--scale 0.9 0.1: must be two values, the smaller first (min max)",
        "--mean 0.5 0.5: must be one value, or one per input channel (3)"]
    assert not (tmp_path / "runs").exists()
    one = parse_args(["--input-size", "1", "32", "32", "--mean", "0.5", "0.5", "0.5", "--std", "0.2"])
    check_ranges(one)  # three for one channel (timm's loader averages them), one for every channel


def test_schedule_and_optimiser_values_that_fail_hang_or_ascend_are_refused(tmp_path, capsys):
    """train.py takes these: --decay-epochs 0 fails in timm's step schedule (division by zero), --lr-cycle-mul 0 in
    its cosine (a logarithm), --lr-noise-pct below 0 hangs it (noise redrawn until below the limit), --seed -1 fails
    in numpy, --remode foo and --gp mean in timm assertions; a negative --decay-rate or --layer-decay makes learning
    rates negative and --momentum 1 never forgets a gradient, both trained on without a word."""
    code = main(["train", *QUICK, "--data-dir", str(tmp_path), "--dataset", "", "--sched", "step", "--decay-epochs",
                 "0", "--decay-rate", "-0.1", "--lr-cycle-mul", "0", "--lr-noise", "0.5", "--lr-noise-pct", "-0.1",
                 "--layer-decay", "-0.5", "--momentum", "1", "--seed", "-1", "--remode", "foo", "--torchcompile",
                 "--torchcompile-mode", "fast", "--gp", "mean", "--output", str(tmp_path / "runs")])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and err[0] == "nfnet-hub train: error: 10 option value(s) out of range:", err
    assert [line.strip().split(":")[0] for line in err[1:]] == [
        "--momentum 1.0", "--decay-rate -0.1", "--decay-epochs 0.0", "--lr-cycle-mul 0.0", "--lr-noise-pct -0.1",
        "--layer-decay -0.5", "--seed -1", "--remode foo", "--gp 'mean'", "--torchcompile-mode fast"]
    assert "must be one of default, " in err[-1] and "max-autotune" in err[-1]
    assert not (tmp_path / "runs").exists()
    check_ranges(parse_args(["--remode", "Const", "--torchcompile-mode", "max-autotune", "--momentum", "0",
                             "--layer-decay", "0.65", "--seed", "0", "--gp", "CatAvgMax"]))  # timm lower-cases modes


def test_a_configs_values_are_typed_as_the_command_line_types_them(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("lr: '0.1'\nmean: 0.5\nepochs: 10.5\nmodel: [a, b]\ninput_size: 32\namp: 'yes'\n"
                      "opt_kwargs: {foo: 1}\nexperiment: no\n")
    assert main(["train", "--config", str(config), "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"nfnet-hub train: error: {config}: 5 value(s) that the option(s) do not take:"
    assert [line.strip() for line in err[1:]] == [
        "epochs: 10.5: expected an integer of at least 1, got '10.5'",
        "model: ['a', 'b']: expected one value, got a list", "input_size: 32: expected a list of 3",
        "amp: 'yes': expected true or false",
        "experiment: False: a YAML boolean (unquoted yes, no, on, off, true, false): quote it to mean the word"]
    config.write_text("lr: '0.1'\nmean: 0.5\nopt_kwargs: {foo: 1}\n")
    args = parse_args(["--config", str(config)])
    assert (args.lr, args.mean, args.opt_kwargs) == (0.1, [0.5], {"foo": 1})  # as --lr 0.1 --mean 0.5 give them


def test_image_options_the_digits_would_ignore_are_refused_by_name(tmp_path, capsys):
    """The digits are arrays: a recipe's RandAugment or a crop fraction would silently not apply to them."""
    code = main(["train", *QUICK, "--config", "f0", "--model", "nfnet_hub_nano", "--hflip", "0", "--crop-pct", "0.9",
                 "--input-img-mode", "YCbCr", "--output", str(tmp_path)])
    err = capsys.readouterr().err.splitlines()
    assert code == 2 and "4 option(s) that --dataset digits would ignore" in err[0] and "image folders" in err[0]
    assert [line.strip() for line in err[1:]] == ["--input-img-mode 'YCbCr'", "--crop-pct 0.9", "--aa 'rand-m5-n4'",
                                                  "--train-interpolation 'bicubic'"]
    assert not list(tmp_path.iterdir())

@pytest.mark.parametrize("terminal", [False, True], ids=["log", "terminal"])
def test_a_bar_on_a_terminal_and_log_lines_in_a_log(tmp_path, capsys, monkeypatch, terminal):
    """In a log file (nohup, a cluster's job log) a bar wrote a line per step for the whole run and no log line."""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)  # capsys's stderr: what it stands for
    quick = QUICK[:QUICK.index("--no-progress")] + QUICK[QUICK.index("--log-interval") + 2:]
    assert main(["train", *quick, "--epochs", "1", "--log-interval", "5", "--output", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    logged = [line.split(" loss")[0] for line in out.splitlines() if " step " in line]
    assert (logged, "it/s" in err) == (([], True) if terminal else (["epoch 0 step 5/22", "epoch 0 step 10/22",
                                                                    "epoch 0 step 15/22", "epoch 0 step 20/22"], False))


def test_agc_without_a_clipping_factor_is_said_to_clip_nothing(tmp_path, capsys):
    """train.py's rule, kept: no --clip-grad, no clipping; for an AGC run a silent surprise."""
    warning = "warning: --clip-mode agc without --clip-grad clips nothing (as in train.py): give --clip-grad"
    for clip, said in (([], True), (["--clip-grad", "0"], False)):  # 0: no clipping, asked for
        assert main(["train", *QUICK, "--epochs", "1", "--clip-mode", "agc", *clip, "--output", str(tmp_path),
                     "--experiment", f"run{len(clip)}"]) == 0
        assert (warning in capsys.readouterr().out) == said


def test_batchnorm_options_are_no_ops_with_a_note(tmp_path, capsys):
    run = build(parse_args([*QUICK, "--sync-bn", "--bn-eps", "0.001", "--output", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "note: --bn-eps 0.001: ignored (NFNets have no BatchNorm)" in out and "--sync-bn True: ignored" in out
    assert run.model.num_classes == 10


def test_learning_rate_scales_with_the_global_batch_as_train_py(tmp_path):
    sgd = parse_args(["--batch-size", "64", "--grad-accum-steps", "2"])
    assert learning_rate(sgd, world=4) == pytest.approx(0.1 * 512 / 256)  # linear
    adamw = parse_args(["--opt", "adamw", "--batch-size", "64"])
    assert learning_rate(adamw, world=1) == pytest.approx(0.1 * (64 / 256) ** 0.5)  # sqrt for ada*
    assert learning_rate(parse_args(["--lr", "0.3"]), world=8) == 0.3


def test_implemented_options_reach_the_model_optimiser_schedule_loss_and_data(tmp_path):
    args = parse_args([*QUICK, "--opt", "adamw", "--opt-betas", "0.8", "0.95", "--opt-kwargs", "amsgrad=True",
                       "--sched", "multistep", "--decay-milestones", "3", "7", "--decay-rate", "0.5", "--epochs", "10",
                       "--model-kwargs", "alpha=0.3", "--head-init-scale", "0", "--head-init-bias", "0.5",
                       "--bce-loss", "--bce-target-thresh", "0.2", "--gp", "max", "--output", str(tmp_path)])
    run = build(args)
    group = run.optimizer.param_groups[0]
    assert type(run.optimizer).__name__ == "AdamW" and group["betas"] == (0.8, 0.95) and group["amsgrad"]
    assert isinstance(run.scheduler, MultiStepLRScheduler) and run.scheduler.decay_t == [3, 7]
    assert run.model.stages[0][0].alpha == 0.3 and run.model.head.global_pool.pool_type == "max"
    assert float(run.model.get_classifier().weight.abs().max()) == 0 and (run.model.get_classifier().bias == 0.5).all()
    assert type(run.criterion).__name__ == "BinaryCrossEntropy" and run.criterion.target_threshold == 0.2


def test_layer_decay_scales_learning_rates_by_depth_and_spares_gains_from_decay(tmp_path):
    run = build(parse_args([*QUICK, "--layer-decay", "0.7", "--output", str(tmp_path)]))
    scales = sorted({g["lr_scale"] for g in run.optimizer.param_groups})
    assert len(scales) > 3 and scales[-1] == 1.0 and scales[0] < 0.2
    names = {id(p): n for n, p in run.model.named_parameters()}
    for g in run.optimizer.param_groups:
        if any(names[id(p)].endswith("gain") for p in g["params"]):
            assert g["weight_decay"] == 0.0


def test_image_folder_data_config_options_are_recorded(tmp_path, digits_folders):
    root = tmp_path / "data"
    for split in ("train", "validation"):
        for label in ("3", "7"):
            shutil.copytree(digits_folders / split / label, root / split / label)
    args = parse_args(["--data-dir", str(root), "--model", "nfnet_hub_nano", "--workers", "0", "--input-size", "3",
                       "64", "64", "--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25", "--crop-pct", "0.8",
                       "--interpolation", "bilinear", "--batch-size", "8", "--output", str(tmp_path / "out")])
    run = build(args)
    assert run.loaders.data_config == {"input_size": [3, 64, 64], "crop_pct": 0.8, "crop_mode": "squash",
                                       "interpolation": "bilinear", "mean": [0.5] * 3, "std": [0.25] * 3,
                                       "label_names": ["3", "7"]}
    x, _ = next(iter(run.loaders.val))
    assert x.shape == (8, 3, 64, 64)


def test_a_validation_split_lacking_a_class_is_scored_with_the_training_splits_labels(tmp_path, digits_folders,
                                                                                      capsys):
    """Each folder split numbers its own classes: validation {3, 7} beside training {3, 5, 7} would score 7s as
    5s (what timm's train.py does); they keep the training split's index 2."""
    root = tmp_path / "data"
    for split, labels in (("train", ("3", "5", "7")), ("validation", ("3", "7"))):
        for label in labels:
            shutil.copytree(digits_folders / split / label, root / split / label)
    run = build(parse_args(["--data-dir", str(root), "--model", "nfnet_hub_nano", "--workers", "0", "--no-prefetcher",
                            "--batch-size", "8", "--output", str(tmp_path / "out")]))
    targets = torch.cat([y for _, y in run.loaders.val]).tolist()
    expected = [{"3": 0, "7": 2}[p.parent.name] for p in sorted((root / "validation").rglob("*.png"))]
    assert targets == expected
    assert run.loaders.data_config["label_names"] == ["3", "5", "7"]
    assert "the validation split lacks 1 of the 3 training classes (5)" in capsys.readouterr().out


def test_a_class_folder_of_files_that_are_not_read_is_named(tmp_path, digits_folders, capsys):
    """timm leaves out a folder of .heic photos silently: the class is missing from the model."""
    root = tmp_path / "data"
    for split in ("train", "validation"):
        for label in ("3", "7"):
            shutil.copytree(digits_folders / split / label, root / split / label)
    (root / "train" / "cat").mkdir()
    for name in ("a.heic", "b.HEIC", ".DS_Store"):
        (root / "train" / "cat" / name).write_bytes(b"not read")
    (root / "train" / "empty").mkdir()
    run = build(parse_args(["--data-dir", str(root), "--model", "nfnet_hub_nano", "--workers", "0", "--batch-size", "8",
                            "--output", str(tmp_path / "out")]))
    assert run.loaders.num_classes == 2
    out = capsys.readouterr().out
    assert "note: 1 folder(s) of the 'train' split hold no image read here (.jpg" in out
    assert "so they are no class: cat (.heic)" in out and "empty" not in out


def test_more_classes_than_the_data_have_train_with_mixup(tmp_path, capsys):
    """--num-classes above the data's count is allowed (as in train.py): MixUp's targets are as wide as the logits.
    It is said, and the ten digits' names are not recorded as the names of twelve classes (they had been, and export
    then dropped them without a word)."""
    result = train(parse_args([*QUICK, "--epochs", "1", "--batch-size", "256", "--num-classes", "12", "--mixup", "0.2",
                               "--output", str(tmp_path), "--experiment", "run"]))
    assert result["model"].num_classes == 12 and result["global_step"] == 1437 // 256
    assert ("note: --num-classes 12, but the training data have 10 classes: classes 10 to 11 have no images, and the "
            "run records no class names") in capsys.readouterr().out
    recorded = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())["data_config"]
    assert "label_names" not in result["model"].pretrained_cfg and recorded["label_names"] is None
    assert count_classes(argparse.Namespace(num_classes=11), {str(i): i for i in range(10)}, 0) == 11
    assert "10 classes: class 10 has no images" in capsys.readouterr().out


def test_sched_on_updates_moves_the_learning_rate_every_update(tmp_path, monkeypatch):
    """timm's warm-up and cosine, per update (the recipes' choice, as the authors' schedule is per step): the
    formulas, against the learning rate each optimiser step sees."""
    seen, step = [], loop.optimizer_step
    monkeypatch.setattr(loop, "optimizer_step", lambda opt, *a, **k: seen.append(opt.param_groups[0]["lr"]) or
                        step(opt, *a, **k))
    train(parse_args([*QUICK, "--epochs", "2", "--batch-size", "256", "--lr", "0.1", "--warmup-epochs", "1",
                      "--sched-on-updates", "--output", str(tmp_path), "--experiment", "run"]))
    updates, warmup = 2 * (1437 // 256), 1437 // 256
    expected = [1e-5 + t * (0.1 - 1e-5) / warmup if t < warmup else 0.05 * (1 + math.cos(math.pi * t / updates))
                for t in range(updates)]
    assert seen == pytest.approx(expected)


def test_val_interval_and_eval_metric_choose_when_and_what_is_best(tmp_path):
    result = train(parse_args([*QUICK, "--epochs", "4", "--val-interval", "2", "--eval-metric", "loss", "--lr", "0.2",
                               "--clip-grad", "0.02", "--clip-mode", "agc", "--output", str(tmp_path),
                               "--experiment", "run"]))
    rows = (Path(result["output"]) / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "3"]
    # train.py's lr column: the rate the epoch trained at (cosine per epoch), not the next epoch's
    lrs = [float(r.split(",")[5]) for r in rows[1:]]
    assert lrs == pytest.approx([0.1 * (1 + math.cos(math.pi * e / 4)) for e in (1, 3)])
    losses = [float(r.split(",")[2]) for r in rows[1:]]
    best = torch.load(Path(result["output"]) / "model_best.pth.tar", weights_only=True)
    assert best["metric"] == pytest.approx(min(losses)) and result["best_top1"] == pytest.approx(min(losses))


def test_every_evaluated_epoch_is_summarised_even_when_it_is_not_kept(tmp_path, capsys):
    """A learning rate of 0 (which train.py takes as given) never improves the metric after epoch 0, so no
    epoch after it is kept by --checkpoint-hist 1; each still gets its row and its line, as in train.py."""
    result = train(parse_args([*QUICK, "--epochs", "3", "--lr", "0", "--checkpoint-hist", "1",
                               "--output", str(tmp_path), "--experiment", "run"]))
    rows = [r.split(",") for r in (Path(result["output"]) / "summary.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["0", "1", "2"] and {r[5] for r in rows} == {"0.0"}
    assert len({r[2] for r in rows}) == 1  # the weights never moved
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()
            if line.startswith("epoch ")] == ["epoch 0", "epoch 1", "epoch 2"]
    assert sorted(p.name for p in Path(result["output"]).glob("checkpoint-*")) == ["checkpoint-0.pth.tar"]


def test_resume_auto_starts_continues_and_leaves_a_finished_run_alone(tmp_path, capsys):
    """--resume auto: a fresh run where there is none, the rest of the epochs where one stopped, and nothing
    (exit 0, files untouched) where it finished; a new run without it is refused there."""
    run = [*QUICK, "--lr", "0.05", "--output", str(tmp_path), "--experiment", "run", "--resume", "auto"]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.yaml").write_text("epochs: 1\n")  # a run that died before its first checkpoint
    train(parse_args([*run, "--epochs", "1"]))
    result = train(parse_args([*run, "--epochs", "2"]))
    out = Path(result["output"])
    assert [r.split(",")[0] for r in (out / "summary.csv").read_text().splitlines()[1:]] == ["0", "1"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(["train", *run, "--epochs", "2"]) == 0
    assert "has finished 2 of 2 epochs; pass --epochs N with N > 2 to train on (the schedule is stretched to N); " \
        "--resume auto leaves it as it is" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert main(["train", *run[:-2], "--epochs", "2"]) == 2
    assert "holds an earlier run" in capsys.readouterr().err


def _nano_optimizer(model):
    """The optimiser timm's train.py builds."""
    from timm.optim import create_optimizer_v2, optimizer_kwargs

    return create_optimizer_v2(model, **optimizer_kwargs(parse_args(["--lr", "0.05"])))


def test_a_checkpoint_of_timms_saver_resumes_here_at_the_next_epoch(tmp_path, capsys):
    """timm's own CheckpointSaver (what train.py writes with), resumed by nfnet-hub train."""
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=10))
    optimizer = _nano_optimizer(model)
    model(torch.randn(4, 3, 32, 32)).sum().backward()
    optimizer.step()
    args = parse_args([*QUICK, "--epochs", "3", "--output", str(tmp_path), "--experiment", "timm"])
    (tmp_path / "timm").mkdir()
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=str(tmp_path / "timm"), max_history=2)
    saver.save_checkpoint(epoch=0, metric=50.0)  # after timm's epoch 0
    ckpt = tmp_path / "timm" / "last.pth.tar"
    run_args = parse_args([*QUICK, "--epochs", "3", "--resume", str(ckpt), "--output", str(tmp_path),
                           "--experiment", "resumed", "--lr", "0.05", "--momentum", "0.9"])
    run = build(run_args)
    from nfnet_hub.train.checkpoints import load_training_state
    from nfnet_hub.train.loop import resume

    start, step, global_step, _, _ = resume(run, load_training_state(ckpt), ckpt)
    assert (start, step, global_step) == (1, 0, run.updates_per_epoch)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[k], v)
    momentum = [s["momentum_buffer"] for s in run.optimizer.state.values()]
    assert momentum and all(torch.equal(a, b["momentum_buffer"]) for a, b in zip(momentum,
                                                                                   optimizer.state.values()))
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(run.scheduler._get_lr(1)[0])


def test_our_checkpoint_resumes_in_timms_resume_checkpoint(trained_nano):
    """What timm's train.py calls on --resume (timm.models.resume_checkpoint), on a checkpoint of ours."""
    path = Path(trained_nano["output"]) / "last.pth.tar"
    ours = torch.load(path, weights_only=True)
    model = timm.create_model("nfnet_hub_nano", num_classes=10)
    optimizer = _nano_optimizer(model)
    epoch = resume_checkpoint(model, str(path), optimizer)  # weights_only=True, as train.py does
    assert epoch == 10  # train.py starts at the epoch after the last finished one
    for k, v in ours["state_dict"].items():
        torch.testing.assert_close(model.state_dict()[k], v)
    assert len(optimizer.state) == len(ours["optimizer"]["state"])


def test_fine_tuning_with_a_new_class_count_reinitialises_only_the_classifier(tmp_path, trained_nano, digits_folders):
    root = tmp_path / "data"
    for split in ("train", "validation"):
        for label in ("1", "7"):
            shutil.copytree(digits_folders / split / label, root / split / label)
    weights = Path(trained_nano["output"]) / "last.pth.tar"
    run = build(parse_args(["--data-dir", str(root), "--model", "nfnet_hub_nano", "--pretrained-path", str(weights),
                            "--workers", "0", "--batch-size", "8", "--output", str(tmp_path / "out")]))
    assert run.model.num_classes == 2 and run.loaders.num_classes == 2
    saved = torch.load(weights, weights_only=True)
    trained = saved.get("state_dict_ema", saved["state_dict"])  # timm's pretrained loading prefers the EMA
    for k, v in run.model.state_dict().items():
        if k.startswith("head.fc."):
            assert v.shape[0] == 2
        else:
            torch.testing.assert_close(v, trained[k], msg=k)
    same = build(parse_args([*QUICK, "--pretrained-path", str(weights), "--output", str(tmp_path / "same")]))
    torch.testing.assert_close(same.model.get_classifier().weight, trained["head.fc.weight"])  # kept where it fits


def test_a_saved_model_trains_with_its_own_preprocessing_as_in_train_py(tmp_path, nano_bundle, digits_folders, capsys):
    """train.py resolves the data config from the model, and a local-dir: or hf-hub: model's is its config.json (32
    px and the digits' mean and std here), not its architecture's default (224 px, ImageNet's): fine-tuned at those,
    the bundle's 99% model started at chance."""
    from safetensors.torch import load_file
    from timm.data import resolve_data_config

    name = f"local-dir:{nano_bundle}"
    expected = resolve_data_config({}, model=timm.create_model(name, pretrained=True))
    assert expected["input_size"] == (3, 32, 32) and expected["mean"] != timm.data.IMAGENET_DEFAULT_MEAN
    run = build(parse_args(["--data-dir", str(digits_folders), "--model", name, "--pretrained", "--workers", "0",
                            "--batch-size", "8", "--output", str(tmp_path / "out")]))
    got = run.loaders.data_config
    assert [tuple(got[k]) for k in ("input_size", "mean", "std")] == [tuple(expected[k]) for k in
                                                                      ("input_size", "mean", "std")]
    assert (got["crop_pct"], got["interpolation"]) == (expected["crop_pct"], expected["interpolation"])
    for k, v in load_file(nano_bundle / "model.safetensors").items():
        torch.testing.assert_close(run.model.state_dict()[k], v, msg=k)
    assert "without --pretrained" not in capsys.readouterr().out
    build(parse_args(["--data-dir", str(digits_folders), "--model", name, "--workers", "0", "--batch-size", "8",
                      "--output", str(tmp_path / "scratch")]))
    assert f"note: --model {name} without --pretrained: its architecture and preprocessing, not its weights" in \
        capsys.readouterr().out


def test_the_default_run_folder_is_one_folder_named_as_train_py_names_models():
    """MODEL-DATASET, with timm's safe_model_name: a local-dir: model or an hfds/ORG/NAME dataset made nested folders
    named 'local-dir:runs' before."""
    from nfnet_hub.train.loop import default_experiment

    for model, dataset, expected in (("nfnet_hub_nano", "digits", "nfnet_hub_nano-digits"),
                                     ("nfnet_hub_f0.dm_in1k", "", "nfnet_hub_f0_dm_in1k-folder"),
                                     ("local-dir:runs/best", "hfds/org/name", "runs_best-hfds_org_name"),
                                     ("hf-hub:me/nano", "wds/shards", "me_nano-wds_shards")):
        assert default_experiment(parse_args(["--model", model, "--dataset", dataset])) == expected


def test_the_optimiser_step_unscales_then_clips_then_steps_then_averages(tmp_path):
    """The project's core ordering, alone: AGC sees the true (unscaled) gradient."""
    torch.manual_seed(0)
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=4, drop_rate=0.0)).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    reference = randomise(timm.create_model("nfnet_hub_nano", num_classes=4, drop_rate=0.0)).train()
    reference.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    opt, ref_opt = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(reference.parameters(), lr=0.1)
    ema = timm.utils.ModelEmaV3(model, decay=0.5)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
    params = [p for n, p in model.named_parameters() if not n.startswith("head.fc")]
    optimizer_step(opt, model, scaler=scaler, clip_grad=0.01, clip_mode="agc", clip_params=params, ema=ema, step=5)
    torch.nn.functional.cross_entropy(reference(x), y).backward()
    adaptive_clip_grad_([p for n, p in reference.named_parameters() if not n.startswith("head.fc")], 0.01)
    ref_opt.step()
    for (name, p), r in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6, msg=name)
        assert p.grad is None
    for name, p in ema.module.named_parameters():
        torch.testing.assert_close(p, 0.5 * initial[name] + 0.5 * dict(model.named_parameters())[name], msg=name)


def test_the_recipes_ema_warms_up_as_the_authors_tf1_ema(tmp_path, monkeypatch, capsys):
    """The authors' EMA (their utils.tf1_ema: decay min(d, (1 + t) / (10 + t)) at update t), in numpy, against the
    recipes' EMA as the loop drives it; a fixed 0.99999 would leave the initial weights in the average."""
    args = parse_args(["--config", "f0"])
    assert args.model_ema and args.model_ema_decay == 0.99999 and args.model_ema_authors_warmup
    torch.manual_seed(0)
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=4))
    ema = create_ema(model, args)
    expected = {k: v.double().numpy().copy() for k, v in model.state_dict().items()}
    for t in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model, step=t + 1)  # the loop's count (checked below)
        decay = min(0.99999, (1 + t) / (10 + t))
        for k, v in model.state_dict().items():
            expected[k] = expected[k] * decay + v.double().numpy() * (1 - decay)
    for k, v in ema.module.state_dict().items():
        np.testing.assert_allclose(v.double().numpy(), expected[k], rtol=1e-4, atol=1e-5, err_msg=k)
    steps = []
    monkeypatch.setattr(timm.utils.ModelEmaV3, "get_decay", lambda self, step=None: steps.append(step) or 0.5)
    result = train(parse_args([*QUICK, "--epochs", "1", "--batch-size", "256", "--model-ema",
                               "--model-ema-authors-warmup", "--output", str(tmp_path), "--experiment", "run"]))
    assert steps == [1, 2, 3, 4, 5]  # 1437 // 256 updates, counted from 1 as train.py counts them
    out = capsys.readouterr().out
    assert "warning: --model-ema-decay" not in out
    # as train.py: the model and the EMA are both evaluated, the EMA's metrics count
    assert f"top-1 {result['metrics']['top1']:.2f}%, " in out and \
        f"(EMA; the model's top-1 {result['metrics']['model_top1']:.2f}%)" in out
    train(parse_args([*QUICK, "--epochs", "1", "--batch-size", "256", "--model-ema", "--output", str(tmp_path),
                      "--experiment", "fixed"]))  # train.py's default decay, 0.9998, without a warm-up
    assert "warning: --model-ema-decay 0.9998 without a warm-up leaves 100% of the initial weights in the EMA after " \
        "the run's 5 updates" in capsys.readouterr().out
    result = train(parse_args([*QUICK, "--epochs", "1", "--batch-size", "256", "--model-ema", "--model-ema-force-cpu",
                               "--output", str(tmp_path), "--experiment", "cpu"]))
    assert "model_top1" not in result["metrics"]  # train.py does not evaluate an EMA kept on the CPU
    with pytest.raises(ValueError, match="two warm-ups: choose one"):
        create_ema(model, parse_args(["--config", "f0", "--model-ema-warmup"]))


def test_more_workers_than_cpus_is_one_note_not_torchs_warnings(tmp_path, digits_folders, monkeypatch, capsys,
                                                               recwarn):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # torch counts CPUs the same way
    tiny = tmp_path / "data"
    for split in ("train", "validation"):
        shutil.copytree(digits_folders / split / "1", tiny / split / "1")
    train(parse_args(["--data-dir", str(tiny), "--model", "nfnet_hub_nano", "--img-size", "32", "--workers", "2",
                      "--batch-size", "16", "--epochs", "1", "--warmup-epochs", "0", "--no-progress", "--output",
                      str(tmp_path / "out")]))
    assert not [w for w in recwarn if "DataLoader will create" in str(w.message)]
    notes = [line for line in capsys.readouterr().out.splitlines() if "--workers" in line]
    assert notes == ["note: --workers 2 starts more loader processes than this process has CPUs (1): torch warns of "
                     "slowness or a freeze; --workers 1 fits them"]


def test_a_folder_of_two_digits_trains_with_train_pys_augmentations(tmp_path, digits_folders):
    root = tmp_path / "data"
    for split in ("train", "validation"):
        for label in ("0", "1"):
            (root / split / label).mkdir(parents=True)
            for f in sorted((digits_folders / split / label).iterdir())[:40]:
                Image.open(f).resize((32, 32)).save(root / split / label / f.name)
    result = train(parse_args(["--data-dir", str(root), "--model", "nfnet_hub_nano", "--img-size", "32", "--workers",
                               "0", "--batch-size", "16", "--epochs", "2", "--warmup-epochs", "0", "--lr", "0.1",
                               "--ratio", "0.9", "1.1", "--vflip", "0.1", "--color-jitter", "0.2", "--reprob", "0.2",
                               "--remode", "const", "--recount", "2", "--train-interpolation", "bilinear",
                               "--no-progress", "--output", str(tmp_path / "out"), "--experiment", "run"]))
    assert result["global_step"] == 2 * (80 // 16)
    saved = yaml.safe_load((Path(result["output"]) / "args.yaml").read_text())
    assert (saved["ratio"], saved["reprob"], saved["train_interpolation"]) == ([0.9, 1.1], 0.2, "bilinear")


def test_torchscript_training_and_wandb_without_wandb(tmp_path, capsys):
    """--torchscript trains the scripted model (its checkpoint loads into a plain one); --log-wandb without the
    optional wandb says so and trains on."""
    result = train(parse_args([*QUICK, "--epochs", "1", "--batch-size", "256", "--torchscript", "--log-wandb",
                               "--output", str(tmp_path), "--experiment", "run"]))
    assert "wandb is not installed" in capsys.readouterr().out
    assert isinstance(result["model"], torch.jit.ScriptModule)
    plain = timm.create_model("nfnet_hub_nano", num_classes=10)
    plain.load_state_dict(torch.load(Path(result["output"]) / "last.pth.tar", weights_only=True)["state_dict"])


def test_a_training_checkpoint_gives_its_ema_weights_as_timms_load_checkpoint(trained_nano):
    """export, bundle, validate and --initial-checkpoint take what timm.create_model(checkpoint_path=...) takes from
    a checkpoint with an EMA (the EMA's weights, which chose model_best), and say so."""
    from nfnet_hub.models.checkpoint import load_model

    path = Path(trained_nano["output"]) / "last.pth.tar"
    model, source = load_model("nfnet_hub_nano", path)
    timms = timm.create_model("nfnet_hub_nano", num_classes=10, checkpoint_path=str(path))
    saved = torch.load(path, weights_only=True)
    assert any(not torch.equal(saved["state_dict"][k], v) for k, v in saved["state_dict_ema"].items())
    for k, v in timms.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0, msg=k)
    assert source.weights == f"{path} (its EMA weights, state_dict_ema, as timm's load_checkpoint takes them)"


def test_resuming_on_other_classes_or_another_input_size_is_said(trained_nano, digits_folders, tmp_path, capsys):
    """timm resumes on whatever data it is given; a run resumed on other classes (of the same count) or at another
    size trains on, but says how its data differ from its checkpoint's."""
    from nfnet_hub.train.checkpoints import load_training_state
    from nfnet_hub.train.loop import resume

    path = Path(trained_nano["output"]) / "last.pth.tar"
    recipe = ["--lr", "0.2", "--clip-grad", "0.02", "--clip-mode", "agc"]  # trained_nano's
    same = build(parse_args([*QUICK, *recipe, "--epochs", "20", "--output", str(tmp_path / "same")]))
    resume(same, load_training_state(path), path)
    assert "warning" not in capsys.readouterr().out
    for split in ("train", "validation"):
        for digit in range(10):
            (tmp_path / "data" / split).mkdir(parents=True, exist_ok=True)
            (tmp_path / "data" / split / f"digit{digit}").symlink_to(digits_folders / split / str(digit))
    other = build(parse_args([*QUICK, *recipe, "--dataset", "", "--data-dir", str(tmp_path / "data"), "--img-size",
                              "64", "--input-img-mode", "YCbCr", "--epochs", "20",
                              "--output", str(tmp_path / "other")]))
    resume(other, load_training_state(path), path)
    out = capsys.readouterr().out
    assert f"warning: {path} was trained on classes 0, 1, 2, 3, 4, 5 ...; the data now have digit0, digit1, " in out
    assert f"warning: {path} was trained with input_size [3, 32, 32]; this run uses [3, 64, 64]" in out
    assert f"warning: {path} was trained with image mode RGB; this run uses YCbCr" in out
    assert f"warning: {path}'s run trained with --lr 0.2" not in out  # the recipe was given again


def test_resuming_without_the_runs_own_recipe_is_said(trained_nano, tmp_path, capsys):
    """A resume takes the options given now, as train.py's does: a run of AGC resumed without it (the way an NFNet
    diverges) says which optimisation options changed and how to give the run's own."""
    from nfnet_hub.train.checkpoints import load_training_state
    from nfnet_hub.train.loop import resume

    path = Path(trained_nano["output"]) / "last.pth.tar"
    plain = build(parse_args([*QUICK, "--epochs", "20", "--output", str(tmp_path)]))
    resume(plain, load_training_state(path), path)
    out = capsys.readouterr().out
    assert (f"warning: {path}'s run trained with --lr 0.2, --clip-mode agc, --clip-grad 0.02; this run with --lr None, "
            f"--clip-mode norm, --clip-grad None (a resumed run takes the options given now, as train.py's does: to "
            f"resume the run as it was, give --config {path.parent / 'args.yaml'})") in out
    state = load_training_state(path)  # train.py saves the rate it resolved from --lr-base 0.1 at batch 64 as --lr
    state["args"] = {**state["args"], "lr": 0.1 * 64 / 256, "clip_mode": "norm", "clip_grad": None}
    again = build(parse_args([*QUICK, "--epochs", "20", "--output", str(tmp_path / "again")]))
    resume(again, state, path)
    assert "'s run trained with" not in capsys.readouterr().out


def test_resume_without_the_optimiser_or_at_another_epoch(trained_nano, tmp_path):
    from nfnet_hub.train.checkpoints import load_training_state
    from nfnet_hub.train.loop import resume

    path = Path(trained_nano["output"]) / "last.pth.tar"
    state = load_training_state(path)
    fresh = build(parse_args([*QUICK, "--epochs", "20", "--no-resume-opt", "--output", str(tmp_path)]))
    start, step, _, _, _ = resume(fresh, state, path)
    assert (start, step) == (10, 0) and not fresh.optimizer.state  # weights restored, momentum not
    later = build(parse_args([*QUICK, "--epochs", "20", "--start-epoch", "15", "--output", str(tmp_path)]))
    start, step, global_step, _, _ = resume(later, state, path)
    assert (start, step, global_step) == (15, 0, 15 * later.updates_per_epoch)


def test_a_checkpoint_of_timms_train_py_exports_with_the_preprocessing_train_py_resolved(tmp_path, capsys):
    """train.py saves its options as an argparse Namespace and no data config: export, bundle, validate and
    --initial-checkpoint read that checkpoint (refused before, as holding Python objects) and preprocess as train.py
    resolved its options (here 48 px, which is not a multiple of the network's stride)."""
    import argparse
    import json

    import onnxruntime as ort
    from timm.data import resolve_data_config
    from timm.utils import ModelEmaV3

    options = {**yaml.safe_load(FIXTURE.read_text()), "img_size": 48, "mean": [0.5, 0.4, 0.3],
               "std": [0.2, 0.25, 0.3], "crop_pct": 0.8, "interpolation": "bilinear", "num_classes": 10}
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=10))
    ema = ModelEmaV3(model)
    randomise(model, seed=1)  # the EMA's weights differ from the model's
    (tmp_path / "timm").mkdir()
    saver = CheckpointSaver(model, _nano_optimizer(model), args=argparse.Namespace(**options), model_ema=ema,
                            checkpoint_dir=str(tmp_path / "timm"))
    saver.save_checkpoint(epoch=0, metric=50.0)
    ckpt = tmp_path / "timm" / "model_best.pth.tar"
    assert main(["export", "nfnet_hub_nano", "--checkpoint", str(ckpt), "--out", str(tmp_path / "out")]) == 0
    assert "from the options of timm's train.py recorded in model_best.pth.tar" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    recorded = json.loads(session.get_modelmeta().custom_metadata_map["nfnet_hub.preprocessing"])
    resolved = resolve_data_config(options, model=timm.create_model("nfnet_hub_nano"))  # as train.py resolves them
    assert recorded["input_size"] == list(resolved["input_size"]) == [3, 48, 48]
    assert {k: recorded[k] for k in ("crop_pct", "crop_mode", "interpolation")} == \
        {k: resolved[k] for k in ("crop_pct", "crop_mode", "interpolation")}
    assert recorded["mean"] == pytest.approx(resolved["mean"]) and recorded["std"] == pytest.approx(resolved["std"])
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = ema.module.eval()(x).numpy()
    np.testing.assert_allclose(session.run(None, {"pixel_values": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)
    run = build(parse_args([*QUICK, "--initial-checkpoint", str(ckpt), "--output", str(tmp_path / "run")]))
    for k, v in ema.module.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[k], v, rtol=0, atol=0, msg=k)


def test_validation_sees_the_pixels_the_export_serves(tmp_path, sample_images):
    """The run validates (and picks model_best, and reports the card's top-1) with the eval transform it records,
    which export, bundle and the runtime apply: for nfnet_hub models that is timm's squash crop, which train.py's
    validation leaves out (it centre-crops non-square images)."""
    from nfnet_hub.preprocess import Preprocess

    for split in ("train", "validation"):
        for label, name in (("a", "chelsea.jpg"), ("b", "coffee.png")):  # 451x300 and 600x400 photos
            (tmp_path / "data" / split / label).mkdir(parents=True)
            shutil.copy(sample_images / name, tmp_path / "data" / split / label / name)
    run = build(parse_args(["--data-dir", str(tmp_path / "data"), "--model", "nfnet_hub_nano", "--img-size", "64",
                            "--workers", "0", "--batch-size", "2", "--no-progress", "--output", str(tmp_path / "o")]))
    assert run.loaders.data_config["crop_mode"] == "squash"
    pre = Preprocess.from_pretrained_cfg(run.loaders.data_config)
    dataset = run.loaders.val.dataset
    for i in range(len(dataset)):
        pixels = dataset[i][0].float() / 255  # the prefetcher normalises on the device
        mean, std = torch.tensor(pre.mean)[:, None, None], torch.tensor(pre.std)[:, None, None]
        expected = torch.from_numpy(pre(dataset.filename(i, absolute=True)))
        torch.testing.assert_close((pixels - mean) / std, expected, rtol=0, atol=1e-5)
