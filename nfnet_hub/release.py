"""Release manifests (``export/release.toml``): build and publish every listed model, resumably.

A bundle is reused, and a published model skipped, only while its manifest entry and the files it names are what
they were when it was built or published: the release state records each entry's settings for that."""
from __future__ import annotations

import hashlib
import json
import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .bundle_files import ONNX_FILES, read_checksums, sha256
from .cards import check_license
from .classes import imagenet_subset, set_class_names
from .errors import BundleError, NfnetHubError, UsageError
from .export_limits import DEFAULT_OPSET, MIN_AGREEMENT, check_opset
from .files import read_text, write_atomically
from .hub import build_bundle, publish, verify_bundle
from .hubclient import check_repo_id

STATE = "release-state.json"
_STRINGS = ("repo_id", "model", "weights", "calibration", "labels", "license", "dataset")
_ENTRY_KEYS = {*_STRINGS, "img_size", "precisions", "private", "min_agreement", "opset"}


def read_manifest(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Entries with defaults applied; every problem is reported before anything is built."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no release manifest at {path}")
    try:
        data = tomllib.loads(read_text(path))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a TOML file: {e}") from None
    problems = []
    if unknown := sorted(set(data) - {"defaults", "model"}):  # a misspelt [defaults] would leave its settings out
        problems.append(f"unknown top-level keys {', '.join(unknown)}: a manifest holds [defaults] and [[model]] "
                        f"tables")
    defaults, models = data.get("defaults", {}), data.get("model", [])
    if not isinstance(defaults, dict):
        problems.append("'defaults' must be a [defaults] table")
        defaults = {}
    if not isinstance(models, list) or not all(isinstance(m, dict) for m in models):
        problems.append("'model' must be [[model]] tables")
        models = []
    entries = [{"precisions": ["fp32"], "license": "apache-2.0", "private": False, "min_agreement": MIN_AGREEMENT,
                **defaults, **raw} for raw in models]
    for i, entry in enumerate(entries):
        problems += [f"model {i}: {problem}" for problem in _entry_problems(entry)]
    repo_ids = [e.get("repo_id") for e in entries]
    for repo_id in sorted({r for r in repo_ids if isinstance(r, str) and repo_ids.count(r) > 1}):
        same = ", ".join(str(i) for i, r in enumerate(repo_ids) if r == repo_id)
        problems.append(f"repo_id {repo_id} is listed by models {same}: one bundle per repository")
    if not entries and not problems:
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
        raise UsageError(f"{path}: " + "; ".join(f"{what} (model{'s' * (len(who) > 1)} {', '.join(map(str, who))})"
                                                 for what, who in missing.items()))
    return entries


def _entry_problems(entry: dict[str, Any]) -> list[str]:
    """What is wrong with one entry (defaults applied), each in words."""
    from .models.checkpoint import check_downloadable, check_model_name

    problems = []
    if unknown := sorted(set(entry) - _ENTRY_KEYS):
        problems.append(f"unknown keys {', '.join(unknown)}")
    problems += [f"missing '{key}'" for key in ("repo_id", "model", "weights") if key not in entry]
    problems += [f"'{key}' must be a non-empty string, got {entry[key]!r}" for key in _STRINGS
                 if key in entry and not (isinstance(entry[key], str) and entry[key])]
    if not isinstance(entry["private"], bool):
        problems.append(f"'private' must be true or false, got {entry['private']!r}")
    precisions = entry["precisions"]
    if not (isinstance(precisions, list) and "fp32" in precisions and all(p in ONNX_FILES for p in precisions)):
        problems.append(f"'precisions' must be a list of {', '.join(ONNX_FILES)} that holds fp32 (the bundle's "
                        f"model.onnx), got {precisions!r}")
    elif "int8" in precisions and "calibration" not in entry:
        problems.append("int8 needs 'calibration' (a folder of images)")
    if not (isinstance(low := entry["min_agreement"], int | float) and not isinstance(low, bool) and 0 <= low <= 1):
        problems.append(f"'min_agreement' (int8's least top-1 agreement with fp32) must be a number between 0 and 1, "
                        f"got {low!r}")
    try:
        check_opset(entry.get("opset", DEFAULT_OPSET))
        if isinstance(entry["license"], str) and entry["license"]:
            check_license(entry["license"])
    except UsageError as e:
        problems.append(str(e))
    if "img_size" in entry and _img_size(entry["img_size"]) is None:
        problems.append(f"'img_size' must be a side or [height, width] in pixels, got {entry['img_size']!r}")
    if isinstance(repo_id := entry.get("repo_id", ""), str) and repo_id:
        try:
            check_repo_id(repo_id)
        except UsageError as e:
            problems.append(str(e))
    model, weights = entry.get("model"), entry.get("weights")
    if weights == "timm:":
        problems.append("'weights' names no pretrained tag: timm:TAG (timm:dm_in1k ...)")
    if isinstance(model, str) and model:  # before a download or a build, as --model is
        tag = weights[5:] if isinstance(weights, str) and weights.startswith("timm:") else ""
        try:
            check_model_name(f"{model}.{tag}" if tag else model)
            if tag:  # before the models listed earlier are built
                check_downloadable(f"{model}.{tag}", give='weights = "PATH"')
        except UsageError as e:
            problems.append(str(e))
    return problems


def _img_size(value: Any) -> int | tuple[int, int] | None:
    """A manifest's ``img_size`` (a side, or [height, width]) as build_bundle takes it; None if it is neither."""
    def side(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if side(value):
        return value
    return tuple(value) if isinstance(value, list) and len(value) == 2 and all(map(side, value)) else None


def _local_path(entry: dict[str, Any], key: str, base: Path) -> Path | None:
    """Where an entry's file or folder is, relative to the manifest; None for what is not on disk: a pretrained
    tag's weights (``timm:TAG``), or labels that name an ImageNet subset where no such file is (as --labels reads)."""
    if key not in entry or (key == "weights" and str(entry[key]).startswith("timm:")):
        return None
    local = (base / entry[key]).resolve()
    return None if key == "labels" and imagenet_subset(str(entry[key])) and not local.exists() else local


def _settings(entry: dict[str, Any]) -> dict[str, Any]:
    """What a bundle is built from: the entry's settings, with the files it names by their contents (a checkpoint
    retrained in place is another model) and the calibration folder by its images' names and sizes."""
    from .preprocess import list_images

    settings = {key: value for key, value in entry.items() if key != "private"}  # private changes no file
    for key in ("weights", "labels"):
        if key in entry and Path(entry[key]).is_absolute():  # read_manifest made local files absolute
            settings[key] = "sha256:" + sha256(Path(entry[key]))
    if "calibration" in entry:
        folder = Path(entry["calibration"])
        listing = "".join(f"{p.relative_to(folder)}\t{p.stat().st_size}\n" for p in list_images(folder))
        settings["calibration"] = "images:" + hashlib.sha256(listing.encode()).hexdigest()
    return settings


def _changes(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "settings not recorded"
    return ", ".join(sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))) + " changed"


def _read_state(path: Path) -> dict[str, dict[str, Any]]:
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not a release state ({e}): move it away to build and publish every model "
                         f"again") from None
    if not (isinstance(state, dict) and all(isinstance(r, dict) for r in state.values())):
        raise UsageError(f"{path} is not a release state: move it away to build and publish every model again")
    return state


def _keep_edited_card(folder: Path, say: Callable[[str], Any]) -> None:
    """A card edited by hand is copied beside its bundle before a rebuild replaces it (with new figures)."""
    card = folder / "README.md"
    try:
        edited = card.is_file() and read_checksums(folder).get("README.md") != sha256(card)
    except BundleError:
        return
    if edited:
        n = 1
        while (kept := folder.parent / f"{folder.name}.README.edited-{n}.md").exists():
            n += 1
        write_atomically(card.read_bytes(), kept)
        say(f"its model card was edited by hand: the edit is kept in {kept}, for the rebuilt card")


def _is_bundle(folder: Path) -> bool:
    try:
        verify_bundle(folder)
        return True
    except BundleError:
        return False


def _build(entry: dict[str, Any], folder: Path, say: Callable[[str], Any], force: bool) -> None:
    from .int8 import load_calibration
    from .models.checkpoint import create_model
    from .preprocess import Preprocess

    say(f"building {entry['model']} from {entry['weights']}")
    weights = str(entry["weights"])
    if weights.startswith("timm:"):  # a pretrained tag, loaded by timm's own machinery
        model = create_model(f"{entry['model']}.{weights[5:]}", pretrained=True)
    else:
        model = create_model(entry["model"], weights)
    size = _img_size(entry["img_size"]) if "img_size" in entry else None
    calibration = None
    if "calibration" in entry:
        calibration = load_calibration(entry["calibration"], Preprocess.for_model(model, img_size=size), say=say)
    if "labels" in entry:
        set_class_names(model, str(entry["labels"]))
    build_bundle(model, folder, img_size=size, precisions=entry["precisions"], calibration=calibration,
                 dataset=entry.get("dataset"), repo_id=entry["repo_id"], license=entry["license"],
                 min_agreement=entry["min_agreement"], force=force, overwrite=folder.exists(),
                 opset=entry.get("opset", DEFAULT_OPSET))


def release(manifest: str | os.PathLike, *, out: str | os.PathLike = "artifacts/release", dry_run: bool = False,
            force: bool = False, endpoint: str | None = None, token: str | None = None) -> list[dict[str, Any]]:
    """Build and publish each entry. An entry published with the same settings (see ``OUT/release-state.json``) is
    skipped, and a bundle built with them is reused; one whose settings changed is built and published again.
    ``force`` writes int8 files below an entry's ``min_agreement`` (the card states the figure)."""
    entries = read_manifest(manifest)
    out = Path(out)
    state_file = out / STATE
    state = _read_state(state_file)
    results = []
    for i, entry in enumerate(entries, 1):
        repo_id = entry["repo_id"]
        try:
            results.append(_release_one(entry, f"[{i}/{len(entries)}] {repo_id}", out, state, dry_run=dry_run,
                                        force=force, endpoint=endpoint, token=token))
        except NfnetHubError as e:  # which of the manifest's models failed, not only why
            raise type(e)(f"{repo_id}: {e.message}", details=e.details) from None
        finally:  # what was built or published stays recorded when the next entry fails
            if state.get(repo_id):
                write_atomically(json.dumps({r: v for r, v in state.items() if v}, indent=2).encode(), state_file)
    return results


def _release_one(entry: dict[str, Any], tag: str, out: Path, state: dict[str, dict[str, Any]], *, dry_run: bool,
                 force: bool, endpoint: str | None, token: str | None) -> dict[str, Any]:
    """Build (or reuse) and publish (or skip) one entry, recording what was done in ``state``."""
    def say(line: str) -> None:
        print(f"{tag}: {line}", flush=True)

    repo_id = entry["repo_id"]
    settings, record = _settings(entry), state.setdefault(repo_id, {})
    folder = out / repo_id.replace("/", "__")
    card = folder / "README.md"
    card_edited = "card" in record and card.is_file() and sha256(card) != record["card"]  # by hand, since
    if "commit" in record and not dry_run:
        if record.get("published") == settings and not card_edited:
            say(f"already published as {record['commit']}, skipped")
            return {"repo_id": repo_id, "skipped": True, "commit": record["commit"], "commit_url": record["commit_url"]}
        why = "its model card edited" if record.get("published") == settings else \
            _changes(record.get("published"), settings)
        say(f"published as {record['commit']} before ({why}): publishing it again")
    if record.get("built") == settings and _is_bundle(folder):
        say(f"reusing the verified bundle in {folder}")
    else:
        if folder.exists():
            built = record.get("built")
            why = "altered or incomplete" if built == settings else _changes(built, settings)
            say(f"the bundle in {folder} is not this entry's ({why}): building it again")
            _keep_edited_card(folder, say)
        _build(entry, folder, say, force)
        record["built"] = settings
    say("checking (dry run)" if dry_run else "publishing")
    result = publish(folder, repo_id, private=entry["private"], dry_run=dry_run, endpoint=endpoint, token=token)
    if result["card_edited"]:
        say(f"its model card (README.md) was edited by hand: {'it would go' if dry_run else 'it went'} up as edited")
    if not dry_run:
        record.update(commit=result["commit"], commit_url=result["commit_url"], published=settings, card=sha256(card))
        say(f"published {result['commit_url']}; pinned: {repo_id}@{result['commit']}")
    return result
