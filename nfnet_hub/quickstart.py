"""The newcomer's tour, offline: train nfnet_hub_nano on scikit-learn's digits with AGC, fold it,
export fp32 and int8 ONNX, bundle it for the Hub, and run the torch-free runtime on the held-out
digits, read back from image files. The digits stay behind as image folders for the README's tour."""
from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from PIL import Image

from .errors import UsageError
from .files import check_writable_folder
from .hub import ONNX_FILES, build_bundle, check_replaceable
from .preprocess import Preprocess, list_images
from .runtime import OnnxClassifier
from .train import parse_args, train
from .train.checkpoints import run_files
from .train.data import digits_split

SIZE = 32
CALIBRATION = 320  # training digits; every fifth is held out to measure int8's agreement with fp32


def train_args(epochs: int) -> list[str]:
    """The quickstart's training recipe (a one-epoch run skips the warm-up it would otherwise spend whole)."""
    return ["--model", "nfnet_hub_nano", "--dataset", "digits", "--img-size", str(SIZE), "--batch-size", "64",
            "--lr", "0.2", "--clip-mode", "agc", "--clip-grad", "0.02", "--smoothing", "0.1", "--drop", "0.1",
            "--checkpoint-hist", "1",
            "--epochs", str(epochs), "--warmup-epochs", str(min(1, epochs - 1))]


def _median_ms(fn, runs: int = 30) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


def digits_images() -> dict[Path, np.ndarray]:
    """The digits split as image files to be, ``{train,validation}/<digit>/<nnnn>.png`` (8x8, as scikit-learn ships
    them; numbered within each digit): the layout timm and nfnet-hub read."""
    xtr, xte, ytr, yte = digits_split()
    return {Path(split, str(label), f"{i:04d}.png"): image
            for split, images, labels in (("train", xtr, ytr), ("validation", xte, yte))
            for label in range(10) for i, image in enumerate(images[labels == label])}


def _same_image(path: Path, expected: np.ndarray | None) -> bool:
    if expected is None:
        return False
    try:
        with Image.open(path) as image:
            return np.array_equal(np.asarray(image), expected)
    except (OSError, ValueError):  # not an image
        return False


def check_digits_folder(root: Path, images: dict[Path, np.ndarray]) -> None:
    """The quickstart writes the digits into ``root``: a folder there holding anything else (the user's own digits
    folder) is refused before any work; the digits an earlier quickstart wrote are written again."""
    if not root.exists():
        return
    if not root.is_dir():
        raise UsageError(f"{root} is a file; the quickstart writes the digits there as image folders: choose "
                         "another --out")
    foreign = sorted(str(p.relative_to(root)) for p in root.rglob("*")  # hidden ones (.DS_Store) are left alone
                     if not p.is_dir() and not any(part.startswith(".") for part in p.relative_to(root).parts)
                     and not _same_image(p, images.get(p.relative_to(root))))
    if foreign:
        raise UsageError(f"{root} holds files the quickstart did not write ({', '.join(foreign[:5])}"
                         + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
                         + "), where it writes the digits: choose another --out, or move them")


def check_quickstart_run(folder: Path) -> None:
    """A rerun replaces the quickstart's earlier run; a run there that it did not make (another model or data, or no
    args.yaml) is refused before any work."""
    try:
        args = yaml.safe_load((folder / "args.yaml").read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        args = None
    ours = vars(parse_args(train_args(1)))
    if not isinstance(args, dict) or any(args.get(k) != ours[k] for k in ("model", "dataset", "img_size")):
        raise UsageError(f"{folder} holds a run the quickstart did not make, where it writes its own: choose another "
                         "--out, or move it")


def write_digits(root: Path, images: dict[Path, np.ndarray] | None = None) -> Path:
    """The digits as image folders under ``root`` (see ``digits_images``)."""
    for path, image in (images if images is not None else digits_images()).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / path)
    return root


def run(out: str | Path = "artifacts/quickstart", epochs: int = 10, progress: bool = True) -> dict[str, Any]:
    out = Path(out)
    check_writable_folder(out)
    check_replaceable(out / "bundle")  # before the training, not after
    digit_images = digits_images()
    check_digits_folder(out / "digits", digit_images)
    earlier = run_files(out / "runs" / "nano-digits")
    if earlier:  # the quickstart's own run folder: a rerun replaces its run, and says so
        check_quickstart_run(out / "runs" / "nano-digits")
        print(f"replacing the earlier quickstart run in {out / 'runs' / 'nano-digits'}", flush=True)
        for f in earlier:
            f.unlink()
    print(f"1/4 training nfnet_hub_nano on scikit-learn's digits ({epochs} epochs, AGC clipping 0.02) ...", flush=True)
    extra = [] if progress else ["--no-progress", "--log-interval", "0"]
    result = train(parse_args([*train_args(epochs), "--output", str(out / "runs"), "--experiment", "nano-digits",
                               *extra]))
    model = result["model"].eval()
    digits = write_digits(out / "digits", digit_images)
    pre = Preprocess.for_model(model)
    train_files = list_images(digits / "train")
    calibration = pre.batch(train_files[::len(train_files) // CALIBRATION][:CALIBRATION])

    print(f"2/4 folding and exporting the last epoch's weights ({out / 'runs' / 'nano-digits' / 'last.pth.tar'}) as "
          "fp32 and int8 ONNX, then building the Hub bundle ...", flush=True)
    bundle = build_bundle(model, out / "bundle", precisions=("fp32", "int8"), calibration=calibration, dataset="digits",
                          metrics={"top1": result["metrics"]["top1"], "top5": result["metrics"]["top5"]},
                          repo_id="YOUR-ORG/nfnet-hub-nano-digits", overwrite=(out / "bundle").exists(),
                          force=True)  # a tour: a short run's weaker int8 is shown, not refused (the card says so)

    print("3/4 evaluating PyTorch and the torch-free ONNX runtime on the held-out digits (image files) ...",
          flush=True)
    files = list_images(digits / "validation")
    labels = np.array([int(f.parent.name) for f in files])
    x = torch.from_numpy(pre.batch(files))
    with torch.no_grad():
        torch_pred = model(x).argmax(-1).numpy()
    rows, preds = [], {}
    one = x[:1]
    with torch.no_grad():
        rows.append(("PyTorch", float((torch_pred == labels).mean() * 100), _median_ms(lambda: model(one)),
                     (bundle / "model.safetensors").stat().st_size))
    for precision in ("fp32", "int8"):
        clf = OnnxClassifier.from_pretrained(bundle, filename=ONNX_FILES[precision])
        pred = np.array([p[0].index for p in clf.predict(files, top_k=1, batch_size=64)])
        preds[precision] = pred
        latency = _median_ms(lambda c=clf: c.logits(one.numpy()))
        rows.append((f"ONNX {precision}", float((pred == labels).mean() * 100), latency,
                     (bundle / ONNX_FILES[precision]).stat().st_size))
    agree = int((preds["fp32"] == torch_pred).sum())
    int8 = json.loads((bundle / "export.json").read_text())["exports"][-1]["int8"]

    print("4/4 done\n")
    print(f"{'model':<12} {'accuracy':>9} {'latency (batch 1)':>18} {'file size':>10}")
    for name, acc, ms, size in rows:
        print(f"{name:<12} {acc:>8.2f}% {ms:>15.3f} ms {size / 1e6:>7.2f} MB")
    print(f"\nONNX fp32 agrees with PyTorch on {agree}/{len(labels)} held-out digits; "
          f"int8 changes accuracy by {rows[2][1] - rows[1][1]:+.2f} points, and agrees with fp32 on "
          f"{int8['top1_agreement']:.1%} of the {int8['held_out_images']} calibration digits it was not calibrated on.")
    if int8["below_threshold"]:
        print(f"Note: that is below the {int8['min_agreement']:.0%} that `nfnet-hub export` and `bundle` require; "
              "the quickstart writes it anyway and its card says so (more epochs give a steadier model).")
    print(f"Bundle: {bundle.resolve()}\nDigits as image folders: {digits.resolve()}")
    print(f"Publish it with:\n  nfnet-hub publish {shlex.quote(str(bundle))} --repo-id YOUR-ORG/nfnet-hub-nano-digits")
    return {"rows": rows, "agree": agree, "n": len(labels), "bundle": bundle, "digits": digits}
