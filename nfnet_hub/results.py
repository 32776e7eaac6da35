"""``predict --results-file``: predictions as a file for scripts, in the columns timm's ``inference.py`` writes.

The format follows the suffix: ``.csv`` has one row per image and one column per rank (``filename``, ``index_0``
..., ``label_0`` ..., ``prob_0`` ..., as inference.py's ``--results-separate-col --include-index``); ``.json`` is a
list of records and ``.jsonl`` one record per line (``filename``, ``index``, ``label``, ``prob``: lists, best
first). Filenames are the paths as given or found, so images of the same name in different folders stay apart.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError
from .files import check_writable_folder, write_atomically
from .runtime import Prediction

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
    write_atomically(text.encode(), path)
