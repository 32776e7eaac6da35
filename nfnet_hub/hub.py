"""Hub bundles: build, verify, and publish (one commit, verified after upload).

A bundle is a folder a Hub repository can hold as is: ``model.safetensors`` and ``config.json``
in timm's schema (so ``timm.create_model("hf-hub:ORG/NAME")`` works), ``model.onnx`` (folded and
verified, optionally ``model_fp16.onnx`` and ``model_int8.onnx``), the model card ``README.md``,
the parity record ``export.json`` and ``checksums.sha256``, which lists every other file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .bundle_files import CHECKSUMS, ONNX_FILES, REQUIRED, read_checksums, sha256
from .errors import BundleError, HubError, UsageError
from .export_limits import DEFAULT_OPSET, MIN_AGREEMENT, ORT_RUNS_FROM, TOLERANCE, check_opset
from .files import atomic_folder, check_writable_folder, is_protected_folder
from .hubclient import check_repo_id, hub_errors, redacted
from .preprocess import DEFAULT_MODES, IMAGE_MODE, Preprocess, data_config, export_size, readable_labels

if TYPE_CHECKING:
    from torch import nn

__all__ = ["BundleError", "ONNX_FILES", "build_bundle", "publish", "verify_bundle"]


def _ort_latency_ms(path: Path, shape: tuple[int, int, int], runs: int = 20) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.zeros((1, *shape), np.float32)
    session.run(None, {"pixel_values": x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {"pixel_values": x})
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1e3)


@contextmanager
def _without_image_mode(model: nn.Module) -> Iterator[None]:
    """``model`` without the image mode in its pretrained_cfg, for timm's ``save_for_hf``: timm's config has no such
    key and would refuse to load a config.json that held it there."""
    cfg = model.pretrained_cfg
    model.pretrained_cfg = {k: v for k, v in cfg.items() if k != IMAGE_MODE}
    try:
        yield
    finally:
        model.pretrained_cfg = cfg


def _colour(record: dict[str, Any]) -> str:
    """How the model card names the images a model reads."""
    pre = Preprocess.from_pretrained_cfg(record)
    return {"RGB": "RGB", "L": "greyscale (1 channel)"}.get(
        pre.image_mode, f"{pre.image_mode or 'no image mode'} ({pre.channels} channels)")


def check_replaceable(out: Path) -> None:
    """``out`` may be replaced only if it is recognisably a bundle: a folder whose checksum file lists
    exactly the files it holds, and never the working folder, one above it, or the home folder."""
    if not out.exists():
        return
    if why := is_protected_folder(out):
        raise BundleError(f"refusing to replace {out}: {why}; choose a new folder for the bundle")
    if not out.is_dir():
        raise BundleError(f"refusing to replace {out}: it is a file, not a bundle folder")
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    try:
        listed = set(read_checksums(out))
    except BundleError:
        listed = None
    if listed is None or set(entries) != listed | {CHECKSUMS}:
        shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
        raise BundleError(f"refusing to replace {out}: it is not a bundle (it holds {shown or 'nothing'}, "
                          f"which its {CHECKSUMS} does not list exactly); choose a new folder for the bundle")


def build_bundle(model: nn.Module, out: str | os.PathLike, *, img_size: int | tuple[int, int] | None = None,
                 label_names: Sequence[str] | None = None, precisions: Sequence[str] = ("fp32",),
                 calibration: np.ndarray | None = None, metrics: dict[str, float] | None = None,
                 dataset: str | None = None, repo_id: str = "ORG/NAME", license: str = "apache-2.0",
                 overwrite: bool = False, min_agreement: float = MIN_AGREEMENT, force: bool = False,
                 opset: int = DEFAULT_OPSET, progress: bool = True) -> Path:
    """Write a verified Hub bundle for ``model`` to the folder ``out`` (built aside, then moved in place).

    ``img_size`` (one side, or (height, width); default: the model's test size) is the size of the ONNX files and
    of the preprocessing recorded in ``config.json``; ``calibration`` must be preprocessed at that size (int8 only).
    ``overwrite`` replaces ``out`` only if it is a bundle (see ``check_replaceable``). ``opset``: of every ONNX file
    (17 to 19 for runtimes older than ONNX Runtime 1.17).
    """
    from timm.models import save_for_hf

    from .cards import card_data, check_license, render_card
    from .export import VERIFY_BATCHES, export_onnx, reference_model
    from .models.checkpoint import model_args, save_safetensors
    from .models.stats import model_stats
    from .onnx_graph import Fp32Graph

    out = Path(out)
    if "fp32" not in precisions:
        raise UsageError("a bundle always holds the fp32 model.onnx: include 'fp32' in precisions")
    if unknown := sorted(set(precisions) - set(ONNX_FILES)):
        raise UsageError(f"unknown precisions {', '.join(unknown)}: choose from {', '.join(ONNX_FILES)}")
    check_opset(opset)
    check_license(license)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; pass overwrite=True (--overwrite) to replace a bundle there")
    check_replaceable(out)
    check_writable_folder(out.parent)
    channels = getattr(model, "in_chans", 3)
    cfg = dict(model.pretrained_cfg)
    size = export_size(cfg, img_size)
    if label_names is not None:
        cfg = {**{k: v for k, v in cfg.items() if k != "label_descriptions"}, "label_names": list(label_names)}
    labels = readable_labels(cfg)
    if labels is not None and len(labels) != model.num_classes:
        raise UsageError(f"{len(labels)} label names for a model with {model.num_classes} classes")
    say = print if progress else (lambda *a, **k: None)
    record = data_config(cfg, size, labels, channels=channels)
    # config.json's top level holds the class names, as timm's, and an image mode, which timm's pretrained_cfg cannot
    top = {k: v for k, v in {**cfg, IMAGE_MODE: record.get(IMAGE_MODE)}.items()
           if k in ("label_names", "label_descriptions", IMAGE_MODE) and v}
    with reference_model(model) as model, atomic_folder(out, replace=overwrite) as tmp:  # fp32, as the ONNX files
        with _without_image_mode(model):
            save_for_hf(model, str(tmp), model_config=top or None, model_args=model_args(model),
                        safe_serialization=True, data_config={k: v for k, v in record.items() if k != IMAGE_MODE})
        save_safetensors(model, tmp / "model.safetensors")  # the same tensors, with the model args and data config
        exports, fp32_graph = [], Fp32Graph()
        for precision in precisions:
            say(f"  exporting {precision} ONNX ...", flush=True)
            r = export_onnx(model, tmp / ONNX_FILES[precision], img_size=size, precision=precision, label_names=labels,
                            calibration=calibration, min_agreement=min_agreement, force=force, opset=opset,
                            fp32_graph=fp32_graph)
            exports.append({**r.to_dict(), "file": ONNX_FILES[precision], "path": None,
                            "latency_ms": _ort_latency_ms(tmp / ONNX_FILES[precision], (channels, *size))})
        (tmp / "export.json").write_text(json.dumps({"exports": exports, "metrics": metrics, "dataset": dataset,
                                                     "data_config": record}, indent=2))
        stats = model_stats(cfg["architecture"], size, num_classes=model.num_classes, in_chans=channels,
                            **model_args(model))
        ws = getattr(getattr(model, "cfg", None), "ws", "timm")
        fields = dict(
            title=repo_id.split("/")[-1], repo_id=repo_id, architecture=cfg["architecture"],
            summary=f"An NFNet image classifier ({model.num_classes} classes"
                    + (f", trained on {dataset})." if dataset else ")."),
            params_m=f"{stats.params / 1e6:.3f}", gmacs=f"{stats.gmacs:.4g}", img_size="x".join(map(str, size)),
            crop_pct=record["crop_pct"], crop_mode=record["crop_mode"], interpolation=record["interpolation"],
            colour=_colour(record), image_mode=record.get(IMAGE_MODE), mean=record["mean"], std=record["std"],
            num_classes=model.num_classes, channels=channels, top_k=min(5, model.num_classes),
            pil_mode=record.get(IMAGE_MODE) or DEFAULT_MODES.get(channels),
            label_key=next((k for k in ("label_descriptions", "label_names") if top.get(k)), None),
            ws_form={"timm": "timm's (w - mean) / sqrt(var + eps)",
                     "deepmind": "the authors' rsqrt(max(var * fan_in, 1e-4))"}[ws],
            act=getattr(getattr(model, "cfg", None), "act", "see timm config"), dataset=dataset,
            metrics={k: round(v, 2) for k, v in (metrics or {}).items()} or None,
            weights_mb=f"{(tmp / 'model.safetensors').stat().st_size / 1e6:.2f}", verify_batches=list(VERIFY_BATCHES),
            exports=[dict(file=e["file"], precision=e["precision"], size_mb=f"{e['file_bytes'] / 1e6:.2f}",
                          max_abs_error=f"{e['max_abs_error']:.2g}", max_rel_error=f"{e['max_rel_error']:.2g}",
                          latency_ms=f"{e['latency_ms']:.2f}") for e in exports],
            int8=next((e["int8"] for e in exports if e.get("int8")), None), opset=opset,
            ort_from=ORT_RUNS_FROM.get(opset))
        (tmp / "README.md").write_text(render_card(fields, card_data(repo_id=repo_id, license=license,
                                                                     dataset=dataset, metrics=metrics)))
        _write_checksums(tmp)
        verify_bundle(tmp)
    return out


def _checksum_text(digests: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in sorted(digests.items()))


def _write_checksums(folder: Path) -> None:
    digests = {p.name: sha256(p) for p in folder.iterdir() if p.is_file() and p.name != CHECKSUMS}
    (folder / CHECKSUMS).write_text(_checksum_text(digests))


def verify_bundle(folder: str | os.PathLike) -> dict[str, Any]:
    """Check a bundle before anything is published; raises BundleError with every problem found."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder} is not a bundle folder")
    problems, card_edited = [], False
    files = {p.name for p in folder.iterdir() if p.is_file()}
    allowed = set(REQUIRED) | set(ONNX_FILES.values()) | {CHECKSUMS}
    if missing := sorted(set(REQUIRED) - files):
        problems.append(f"missing files: {', '.join(missing)}")
    if extra := sorted(files - allowed) + sorted(p.name + "/" for p in folder.iterdir() if p.is_dir()):
        problems.append(f"unexpected files: {', '.join(extra)}")
    try:
        sums = read_checksums(folder)
        if listed_missing := sorted(set(sums) - files):
            problems.append(f"{CHECKSUMS} lists files that are missing: {', '.join(listed_missing)}")
        for name in sorted(files - {CHECKSUMS}):
            if name not in sums:
                problems.append(f"{name} is not in {CHECKSUMS}")
            elif sha256(folder / name) != sums[name]:
                card_problem = _card_problem(folder / name) if name == "README.md" else None
                card_edited = name == "README.md" and card_problem is None  # the one file meant to be edited
                if not card_edited:
                    problems.append(card_problem or f"{name} does not match its checksum")
    except BundleError as e:
        problems.append(str(e))
    config: dict[str, Any] = {}
    if "config.json" in files:
        try:
            config = json.loads((folder / "config.json").read_text())
            problems += [f"config.json: {p}" for p in _config_problems(config)]
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            problems.append(f"config.json is not JSON: {e}")
    record: dict[str, Any] = {}
    if "export.json" in files:
        try:
            record = json.loads((folder / "export.json").read_text())
            problems += _record_problems(record, files, TOLERANCE)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError) as e:
            problems.append(f"export.json is not a parity record: {e}")
    for name in sorted(files & set(ONNX_FILES.values())):
        import onnx

        try:
            onnx.checker.check_model(str(folder / name))
        except Exception as e:  # the checker raises several types for corrupt files
            problems.append(f"{name} is not a valid ONNX model: {str(e).splitlines()[0]}")
    if problems:
        raise BundleError(f"bundle {folder} failed verification: " + "; ".join(problems))
    return {"config": config, "record": record, "files": sorted(files), "card_edited": card_edited}


def _card_problem(path: Path) -> str | None:
    """Why a model card edited since bundling cannot be published (the Hub refuses front matter it cannot parse)."""
    from huggingface_hub import ModelCard

    from .cards import check_license

    try:
        license = ModelCard(path.read_text(encoding="utf-8"), ignore_metadata_errors=False).data.license
        if isinstance(license, str):
            check_license(license)
    except UnicodeDecodeError:
        return "README.md (edited since bundling) is not UTF-8 text"
    except Exception as e:  # yaml's errors and huggingface_hub's ValueError: front matter the Hub refuses
        reason = " ".join(str(e).split())
        return f"README.md (edited since bundling) has front matter the Hub refuses: {reason[:200]}"
    return None


def _record_problems(record: dict[str, Any], files: set[str], tolerance: dict[str, float]) -> list[str]:
    problems = []
    recorded = {e["file"] for e in record.get("exports", [])}
    if unrecorded := sorted((files & set(ONNX_FILES.values())) - recorded):
        problems.append(f"export.json has no parity record for {', '.join(unrecorded)}")
    if absent := sorted(recorded - files):
        problems.append(f"export.json records files that are missing: {', '.join(absent)}")
    for e in record.get("exports", []):
        limit = tolerance.get(e["precision"])
        if limit is not None and not e["max_rel_error"] <= limit:
            problems.append(f"{e['file']}: parity {e['max_rel_error']:.3g} exceeds {limit:g}")
    return problems


def _config_problems(cfg: dict[str, Any]) -> list[str]:
    problems = []
    for key, kind in (("architecture", str), ("num_classes", int), ("pretrained_cfg", dict)):
        if not isinstance(cfg.get(key), kind):
            problems.append(f"'{key}' must be a {kind.__name__}")
    pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else {}
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        if key not in pre:
            problems.append(f"pretrained_cfg lacks '{key}'")
    labels = cfg.get("label_names")
    if labels is not None and len(labels) != cfg.get("num_classes"):
        problems.append(f"{len(labels)} label_names for {cfg.get('num_classes')} classes")
    return problems


def publish(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
            create_pr: bool = False, dry_run: bool = False, token: str | None = None,
            endpoint: str | None = None) -> dict[str, Any]:
    """Upload a verified bundle in one commit, then download it back and compare checksums.

    The token comes from ``token``, ``HF_TOKEN`` or the login cache (huggingface_hub's rules); it is
    never printed or logged.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    from .cards import card_for_repo

    check_repo_id(repo_id)
    folder = Path(folder)
    info = verify_bundle(folder)
    sums = read_checksums(folder)
    uploads: dict[str, str | bytes] = {name: str(folder / name) for name in info["files"]}
    card, built_for = card_for_repo((folder / "README.md").read_text(), repo_id)
    if built_for or info["card_edited"]:  # the card as it reads in repo_id; the bundle folder stays as it is
        uploads["README.md"] = card.encode()
        sums["README.md"] = hashlib.sha256(uploads["README.md"]).hexdigest()
        uploads[CHECKSUMS] = _checksum_text(sums).encode()
    plan = {"repo_id": repo_id, "files": info["files"], "private": private, "revision": revision,
            "create_pr": create_pr, "bytes": sum((folder / f).stat().st_size for f in info["files"]),
            "card_built_for": built_for, "card_edited": info["card_edited"]}
    if dry_run:
        return {**plan, "dry_run": True}
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(f"publishing to {repo_id}", endpoint):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:  # create_repo leaves an existing repository as it is
            raise HubError(f"{repo_id} exists and is public, and --private does not change that: nothing was "
                           "uploaded (make it private in its settings on the Hub, or publish without --private)")
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in uploads.items()]
        commit = api.create_commit(repo_id, operations, revision=revision, create_pr=create_pr,  # one commit, always
                                   commit_message=f"Upload {info['config'].get('architecture', 'model')} bundle "
                                                  "(nfnet-hub)")
    ref = commit.oid
    with tempfile.TemporaryDirectory() as cache, hub_errors(f"verifying the upload to {repo_id}", endpoint):
        for name, digest in sums.items():
            got = Path(hf_hub_download(repo_id, name, revision=ref, cache_dir=cache, endpoint=endpoint,
                                       token=token))
            if sha256(got) != digest:
                raise BundleError(f"after upload, {name} on the Hub does not match the bundle's checksum")
    return {**plan, "commit": ref, "commit_url": redacted(commit.commit_url),
            "pr_url": commit.pr_url and redacted(commit.pr_url), "verified": True}
