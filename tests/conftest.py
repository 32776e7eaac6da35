"""Shared test helpers.

NFNets start with zero skip gains, which hides every residual branch: tests randomise every gain,
skip gain and bias before comparing anything.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# Triton kernels (AGC's) run here on CPU tensors through Triton's interpreter, read when they are defined
os.environ.setdefault("TRITON_INTERPRET", "1")
# pytest-xdist: each worker (and each process it starts) gets its share of the cores, not all of them
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1  # Linux's
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

import nfnet_hub  # noqa: E402,F401  (registers the models)


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random gains (around 1, and of both signs for skip gains), biases and classifier."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("skipinit_gain"):
            p.copy_(noise * 0.25)
        elif name.endswith("gain"):
            p.copy_(1.0 + 0.3 * noise)
        elif name.endswith("bias"):
            p.copy_(0.1 * noise)
        elif name.startswith("head.fc"):
            p.copy_(0.05 * noise)
    return model.eval()


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Normwise relative error ``||a - b|| / ||b||`` against the reference ``b``."""
    return float(torch.linalg.vector_norm((a - b).double()) / torch.linalg.vector_norm(b.double()))


def run_card_code(bundle: Path, repo_id: str, image: Path, prelude: str = "") -> list[str]:
    """The stdout of each Python block of a bundle's model card, run as a reader runs it, against the bundle on disk
    instead of the Hub (its folder where the card names the repository, ``image`` for image.jpg)."""
    import subprocess
    import sys

    outputs = []
    for block in (bundle / "README.md").read_text().split("```python\n")[1:]:
        code = block.split("```")[0].replace(f"hf-hub:{repo_id}", f"local-dir:{bundle}") \
            .replace(f'"{repo_id}"', f'"{bundle}"').replace("image.jpg", str(image))
        run = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        outputs.append(run.stdout)
    return outputs


def eight_bit_photos(sample_images: Path) -> list[Path]:
    """The sample photos that timm's loader reads as the runtime does (it clips 16-bit ones: see test_runtime)."""
    return [p for p in sorted(sample_images.iterdir()) if "16bit" not in p.name]


@pytest.fixture(scope="session")
def sample_images(tmp_path_factory):
    """Real photos that ship with scikit-image, written as files of several modes."""
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.jpg", quality=95)
    Image.fromarray(data.coffee()).save(folder / "coffee.png")
    Image.fromarray(data.camera()).save(folder / "camera_grey.png")
    rgba = np.dstack([data.rocket(), np.full(data.rocket().shape[:2], 200, np.uint8)])
    Image.fromarray(rgba).save(folder / "rocket_rgba.png")
    Image.fromarray(data.moon().astype(np.uint16) * 257).save(folder / "moon_16bit.png")
    return folder


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """The folder ``build`` fills, built once per test run: the first pytest-xdist worker to ask builds it while
    the others wait for it (each would otherwise build its own)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    root = root.parent if "PYTEST_XDIST_WORKER" in os.environ else root  # the run's folder, above the workers'
    folder, built = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)  # what a worker that failed to build it left
            folder.mkdir()
            build(folder)
            built.touch()
    return folder


def _train_nano(out: Path) -> None:
    from nfnet_hub.models.checkpoint import save_safetensors
    from nfnet_hub.train import parse_args, train

    result = train(parse_args(["--model", "nfnet_hub_nano", "--dataset", "digits", "--no-progress", "--log-interval",
                               "0", "--clip-grad", "0.02", "--clip-mode", "agc", "--warmup-epochs", "1", "--epochs",
                               "10", "--batch-size", "64", "--lr", "0.2", "--model-ema", "--model-ema-decay", "0.99",
                               "--checkpoint-hist", "3", "--output", str(out), "--experiment", "nano"]))
    save_safetensors(result["model"], out / "model.safetensors")  # the trained model, not its EMA
    (out / "result.json").write_text(json.dumps({k: result[k] for k in ("metrics", "global_step", "best_top1")}))


@pytest.fixture(scope="session")
def trained_nano(tmp_path_factory):
    """nfnet_hub_nano trained on scikit-learn's digits once for the whole suite (10 epochs, AGC, EMA).

    Returns the training result: ``model`` (eval mode; do not change it), ``output`` (the run folder with
    its checkpoints and args.yaml) and ``metrics``. Every worker reads the model back from the same file, so
    that no test depends on which worker trained it."""
    from nfnet_hub.models.checkpoint import create_model

    folder = built_once(tmp_path_factory, "trained", _train_nano)
    run = folder / "nano"
    drop = yaml.safe_load((run / "args.yaml").read_text())["drop"]  # as the run built it
    model = create_model("nfnet_hub_nano", folder / "model.safetensors", drop_rate=drop)
    model.eval().requires_grad_(False)
    return {**json.loads((folder / "result.json").read_text()), "output": str(run), "model": model}


@pytest.fixture(scope="session")
def digits_folders(tmp_path_factory):
    """The digits split as image folders, root/{train,validation}/<digit>/<n>.png, as the quickstart writes them."""
    from nfnet_hub.quickstart import write_digits

    return write_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def nano_bundle(trained_nano, digits_folders, tmp_path_factory):
    """A bundle (fp32 and int8) of the suite's trained nano, built once."""
    from nfnet_hub.hub import build_bundle
    from nfnet_hub.preprocess import Preprocess, list_images

    def build(folder: Path) -> None:
        model = trained_nano["model"]
        calibration = Preprocess.from_pretrained_cfg(model.pretrained_cfg).batch(
            list_images(digits_folders / "train")[::12])
        build_bundle(model, folder / "bundle", precisions=("fp32", "int8"), calibration=calibration,
                     dataset="digits", repo_id="me/nano-digits", progress=False)

    return built_once(tmp_path_factory, "bundle", build) / "bundle"
