"""Release manifests (``export/release.toml``): build and publish every listed model, resumably."""
from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any

from .classes import imagenet_subset, set_class_names
from .errors import BundleError, UsageError
from .hub import build_bundle, publish, verify_bundle
from .hubclient import check_repo_id

STATE = "release-state.json"
_ENTRY_KEYS = {"repo_id", "model", "weights", "img_size", "precisions", "calibration", "labels", "license",
               "dataset", "private"}


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries with defaults applied; every problem is reported before anything is built."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no release manifest at {path}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a TOML file: {e}") from None
    defaults = data.get("defaults", {})
    entries, problems = [], []
    for i, raw in enumerate(data.get("model", [])):
        entry = {"precisions": ["fp32"], "license": "apache-2.0", "private": False, **defaults, **raw}
        if unknown := sorted(set(entry) - _ENTRY_KEYS):
            problems.append(f"model {i}: unknown keys {', '.join(unknown)}")
        for key in ("repo_id", "model", "weights"):
            if key not in entry:
                problems.append(f"model {i}: missing '{key}'")
        try:
            check_repo_id(entry.get("repo_id", ""))
        except UsageError as e:
            problems.append(f"model {i}: {e}")
        if "int8" in entry["precisions"] and "calibration" not in entry:
            problems.append(f"model {i}: int8 needs 'calibration' (a folder of images)")
        entries.append(entry)
    if not entries:
        problems.append("the manifest lists no [[model]]")
    if problems:
        raise UsageError(f"{path}: " + "; ".join(problems))
    missing: dict[str, list[int]] = {}  # what is missing -> the models that need it
    for i, e in enumerate(entries):
        for key, kind, there in (("calibration", "folder", Path.is_dir), ("labels", "file", Path.is_file),
                                 ("weights", "file", Path.is_file)):
            if (local := _local_path(e, key, path.parent)) is None:
                continue
            e[key] = str(local)
            if not there(local):
                missing.setdefault(f"no {key} {kind} at {local}", []).append(i)
    if missing:  # before hours of building, not in the middle of them
        raise UsageError(f"{path}: " + "; ".join(f"{what} (model{'s' * (len(models) > 1)} "
                                                 f"{', '.join(map(str, models))})" for what, models in missing.items()))
    return entries


def _local_path(entry: dict[str, Any], key: str, base: Path) -> Path | None:
    """Where an entry's file or folder is, relative to the manifest; None for what is not on disk: a pretrained
    tag's weights (``timm:TAG``), or labels that name an ImageNet subset where no such file is (as --labels reads)."""
    if key not in entry or (key == "weights" and str(entry[key]).startswith("timm:")):
        return None
    local = (base / entry[key]).resolve()
    return None if key == "labels" and imagenet_subset(str(entry[key])) and not local.exists() else local


def _load(entry: dict[str, Any]):
    from .models.checkpoint import create_model

    weights = str(entry["weights"])
    if weights.startswith("timm:"):  # a pretrained tag, loaded by timm's own machinery
        return create_model(f"{entry['model']}.{weights[5:]}", pretrained=True)
    return create_model(entry["model"], weights)


def release(manifest: str | os.PathLike, *, out: str | os.PathLike = "artifacts/release", dry_run: bool = False,
            endpoint: str | None = None, token: str | None = None) -> list[dict[str, Any]]:
    """Build and publish each entry; entries already published (see ``OUT/release-state.json``) are skipped."""
    from .int8 import load_calibration
    from .preprocess import Preprocess

    entries = read_manifest(manifest)
    out = Path(out)
    state_file = out / STATE
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    results = []
    for i, entry in enumerate(entries, 1):
        repo_id = entry["repo_id"]
        tag = f"[{i}/{len(entries)}] {repo_id}"
        if repo_id in state and not dry_run:
            print(f"{tag}: already published as {state[repo_id]['commit']}, skipped", flush=True)
            results.append({"repo_id": repo_id, "skipped": True, **state[repo_id]})
            continue
        folder = out / repo_id.replace("/", "__")
        try:
            verify_bundle(folder)
            print(f"{tag}: reusing the verified bundle in {folder}", flush=True)
        except BundleError:
            print(f"{tag}: building {entry['model']} from {entry['weights']}", flush=True)
            model = _load(entry)
            size = entry.get("img_size")
            calibration = None
            if "calibration" in entry:
                pre = Preprocess.for_model(model, img_size=size)
                calibration = load_calibration(entry["calibration"], pre,
                                               say=lambda line, tag=tag: print(f"{tag}: {line}", flush=True))
            if "labels" in entry:
                set_class_names(model, str(entry["labels"]))
            build_bundle(model, folder, img_size=size, precisions=entry["precisions"],
                         calibration=calibration, dataset=entry.get("dataset"), repo_id=repo_id,
                         license=entry["license"], overwrite=folder.exists())
        print(f"{tag}: {'checking (dry run)' if dry_run else 'publishing'}", flush=True)
        result = publish(folder, repo_id, private=entry["private"], dry_run=dry_run, endpoint=endpoint, token=token)
        if not dry_run:
            state[repo_id] = {"commit": result["commit"], "commit_url": result["commit_url"]}
            out.mkdir(parents=True, exist_ok=True)
            state_file.write_text(json.dumps(state, indent=2))
            print(f"{tag}: published {result['commit_url']}", flush=True)
        results.append(result)
    return results
