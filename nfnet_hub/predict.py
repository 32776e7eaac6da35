"""The ``predict`` command: image files and folders classified by the torch-free runtime, printed for people or
written for scripts (``--results-file``) in the columns timm's ``inference.py`` writes.

A results file's format follows its suffix: ``.csv`` has one row per image and one column per rank (``filename``,
``index_0`` ..., ``label_0`` ..., ``prob_0`` ..., as inference.py's ``--results-separate-col --include-index``);
``.json`` is a list of records and ``.jsonl`` one record per line (``filename``, ``index``, ``label``, ``prob``:
lists, best first). Filenames are the paths as given or found, so images of one name in two folders stay apart.
An image that does not decode, or is larger than ``--max-image-pixels``, is named on stderr and skipped (the exit
status is then 1).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .argtypes import positive
from .bundle_files import ONNX_FILES
from .errors import UsageError
from .files import check_writable_folder, write_atomically
from .preprocess import Preprocess, list_images, open_image
from .runtime import OnnxClassifier, Prediction, precision_file

FORMATS = (".csv", ".json", ".jsonl")


def check_results_file(path: str, *, overwrite: bool) -> Path:
    """The results file to write, refused before any work if it cannot be written or would replace a file."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise UsageError(f"--results-file {path} is a folder; name a file in it")
    if target.suffix.lower() not in FORMATS:
        raise UsageError(f"--results-file {path}: the suffix chooses the format, one of {', '.join(FORMATS)}")
    if target.exists() and not overwrite:
        raise UsageError(f"--results-file {path} exists; pass --overwrite to replace it")
    check_writable_folder(target.parent)
    return target


def _record(filename: str, preds: Sequence[Prediction]) -> dict:
    return {"filename": filename, "index": [p.index for p in preds], "label": [p.label for p in preds],
            "prob": [p.probability for p in preds]}


def _csv(rows: Sequence[tuple[str, Sequence[Prediction]]]) -> str:
    k = max(len(preds) for _, preds in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["filename", *(f"{col}_{i}" for col in ("index", "label", "prob") for i in range(k))])
    for filename, preds in rows:
        writer.writerow([filename, *(p.index for p in preds), *(p.label for p in preds),
                         *(repr(p.probability) for p in preds)])
    return out.getvalue()


def write_results(path: Path, rows: Sequence[tuple[str, Sequence[Prediction]]]) -> None:
    """Write ``(filename, predictions)`` rows whole or not at all, in the format of ``path``'s suffix."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        text = _csv(rows)
    elif suffix == ".json":
        text = json.dumps([_record(f, p) for f, p in rows], indent=2) + "\n"
    else:
        text = "".join(json.dumps(_record(f, p)) + "\n" for f, p in rows)
    write_atomically(text.encode("utf-8", "surrogateescape"), path)  # file names in another encoding: their bytes


def image_progress(verb: str) -> Callable[[int, int], None]:
    """A report of the images done so far, on stderr: one updated line on a terminal, a line per tenth in a log."""
    before = 0

    def report(done: int, total: int) -> None:
        nonlocal before
        if sys.stderr.isatty():
            print(f"\r{verb} {done}/{total} images", end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done * 10 // total != before * 10 // total:
            print(f"{verb} {done}/{total} images", file=sys.stderr, flush=True)
        before = done
    return report


def _readable(paths: list[str], preprocess: Preprocess, *, alone: bool,
              max_pixels: int) -> tuple[list[np.ndarray], list[str]]:
    """The images of ``paths`` that decode, preprocessed (read in the model's image mode, one decoded image held at a
    time), and their names; each one that does not, or is too large, is named on stderr and skipped (a lone image's
    failure is the command's error)."""
    rows, names = [], []
    for path in paths:
        try:
            rows.append(preprocess(open_image(path, max_pixels=max_pixels, limit_option="--max-image-pixels")))
            names.append(path)
        except UsageError as e:
            if alone:
                raise
            print(f"nfnet-hub predict: skipped {e}", file=sys.stderr, flush=True)
    return rows, names


def add_predict_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("images", nargs="+", help="image files, or folders (their images, recursively)")
    s.add_argument("--model", required=True, help="a bundle folder, a Hub repo id ORG/NAME[@REVISION] or an ONNX file "
                   "that nfnet-hub exported (export's out/model.onnx)")
    s.add_argument("--top-k", "--topk", type=positive, default=5, help="labels per image")
    s.add_argument("--batch-size", type=positive, default=16, help="images per ONNX Runtime call")
    s.add_argument("--precision", choices=tuple(ONNX_FILES), help="which of the bundle's ONNX models, as serve "
                   "chooses (default: fp32)")
    s.add_argument("--filename", help="the bundle's ONNX file by name, instead of --precision")
    s.add_argument("--results-file", help="write the predictions to this file instead of the screen, in the format "
                   "its suffix names: .csv (timm inference.py's columns), .json or .jsonl (records)")
    s.add_argument("--overwrite", action="store_true", help="replace --results-file if it exists")
    s.add_argument("--max-image-pixels", type=positive, default=178_956_970, help="largest image (width x height) "
                   "read; larger ones are skipped before they are decoded (default: the size Pillow refuses above)")


def cmd_predict(args: argparse.Namespace) -> int:
    out = check_results_file(args.results_file, overwrite=args.overwrite) if args.results_file else None
    images = [str(f) for i in args.images for f in (list_images(i) if Path(i).is_dir() else [i])]
    if args.filename and args.precision:
        raise UsageError("--filename and --precision both choose the ONNX file: give one")
    filename = precision_file(args.model, args.precision) if args.precision else args.filename or ONNX_FILES["fp32"]
    clf = OnnxClassifier.from_pretrained(args.model, filename=filename)
    clf.preprocess.require_image_mode()
    pillow_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # --max-image-pixels is the one limit
    try:
        return _predict(clf, images, out, args)
    finally:
        Image.MAX_IMAGE_PIXELS = pillow_limit


def _predict(clf: OnnxClassifier, images: list[str], out: Path | None, args: argparse.Namespace) -> int:
    rows, skipped, progress = [], 0, image_progress("predicted")
    for start in range(0, len(images), args.batch_size):  # a batch at a time: a large folder prints as it goes
        batch = images[start:start + args.batch_size]
        pixels, names = _readable(batch, clf.preprocess, alone=len(images) == 1, max_pixels=args.max_image_pixels)
        skipped += len(batch) - len(pixels)
        results = clf.predictions(np.stack(pixels), top_k=args.top_k) if pixels else []
        if out:
            rows += zip(names, results)
            progress(start + len(batch), len(images))
            continue
        for image, preds in zip(names, results):
            print(image)
            for p in preds:
                print(f"  {p.probability:7.2%}  {p.label}")
        sys.stdout.flush()
    if skipped == len(images):
        raise UsageError(f"none of the {len(images)} images is readable" + (f"; {out} not written" if out else ""))
    if out:
        write_results(out, rows)
        print(f"wrote {len(rows)} predictions to {out}", flush=True)
    if skipped:
        print(f"nfnet-hub predict: {skipped} of {len(images)} images skipped (unreadable or too large)",
              file=sys.stderr)
        return 1
    return 0
