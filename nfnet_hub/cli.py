"""The ``nfnet-hub`` command line: thin wrappers over the library modules."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _cmd_list(args: argparse.Namespace) -> int:
    from .models.nfnet import default_cfgs
    from .models.stats import model_stats
    from .models.variants import VARIANTS, model_name

    rows = [("model", "params", "GMACs@train", "GMACs@test", "train px", "test px", "pretrained tags")]
    for variant, v in VARIANTS.items():
        name = model_name(variant)
        train, test = model_stats(name, v.train_size), model_stats(name, v.test_size)
        tags = [t for t in default_cfgs[name].tags if t] or ["-"]
        rows.append((name, f"{train.params / 1e6:.1f}M", f"{train.gmacs:.4g}", f"{test.gmacs:.4g}",
                     str(v.train_size), str(v.test_size), ", ".join(tags)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import timm

    from .models.convert import check_fit, convert_deepmind, read_state_dict, save_safetensors
    from .models.nfnet import DEEPMIND_NUMERICS

    arrays = read_state_dict(args.checkpoint)
    model = timm.create_model(args.model, num_classes=args.num_classes, **DEEPMIND_NUMERICS)
    sd = convert_deepmind(arrays, model)
    check_fit(sd, model, args.checkpoint)
    model.load_state_dict(sd)
    out = save_safetensors(model, args.out, {"nfnet_hub.source": Path(args.checkpoint).name})
    print(f"wrote {out} ({len(sd)} tensors, the authors' numerics: {DEEPMIND_NUMERICS})")
    return 0


def _load_images(folder: str | None) -> list[Path] | None:
    from .runtime import list_images

    return list_images(folder) if folder else None


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .models.convert import create_model
    from .runtime import Preprocess

    print(f"loading {args.model} ...", flush=True)
    model = create_model(args.model, args.checkpoint)
    labels = Path(args.labels).read_text().split("\n") if args.labels else None
    labels = [label for label in labels if label] if labels else None
    calibration = None
    if args.precision == "int8":
        if not args.calibration:
            raise ValueError("--precision int8 needs --calibration DIR (images to calibrate the quantisation on)")
        cfg = dict(model.pretrained_cfg)
        size = args.img_size or (cfg.get("test_input_size") or cfg["input_size"])[-1]
        pre = Preprocess.from_pretrained_cfg({**cfg, "input_size": (3, size, size), "test_input_size": None})
        calibration = pre.batch(_load_images(args.calibration))
    print(f"folding, exporting ({args.precision}) and verifying ...", flush=True)
    report = export_onnx(model, Path(args.out) / args.filename, img_size=args.img_size, precision=args.precision,
                         opset=args.opset, label_names=labels, calibration=calibration)
    print(f"wrote {report.path}: {report.precision}, opset {report.opset}, {report.img_size[0]}px, "
          f"{report.nodes} nodes, {report.file_bytes / 1e6:.1f} MB; ONNX Runtime vs PyTorch max abs error "
          f"{report.max_abs_error:.3g} (relative {report.max_rel_error:.3g}) at batches {report.verify_batches}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .export import validate_onnx
    from .models.convert import create_model

    model = create_model(args.model, args.checkpoint)
    r = validate_onnx(args.onnx, model, _load_images(args.images))
    print(json.dumps(r.__dict__, indent=2))
    return 0


def _cmd_train(argv: list[str]) -> int:
    from .train import parse_args, train

    result = train(parse_args(argv))
    if result["metrics"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: top-1 {result['metrics']['top1']:.2f}% after {result['global_step']} steps; "
              f"checkpoints in {result['output']}")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from .hub import build_bundle
    from .models.convert import create_model
    from .runtime import Preprocess

    model = create_model(args.model, args.checkpoint)
    labels = [line for line in Path(args.labels).read_text().splitlines() if line] if args.labels else None
    calibration = None
    if "int8" in args.precision:
        if not args.calibration:
            raise ValueError("int8 needs --calibration DIR (images to calibrate the quantisation on)")
        calibration = Preprocess.from_pretrained_cfg(model.pretrained_cfg).batch(_load_images(args.calibration))
    metrics = json.loads(Path(args.metrics).read_text()) if args.metrics else None
    out = build_bundle(model, args.out, label_names=labels, precisions=["fp32", *args.precision],
                       calibration=calibration, metrics=metrics, dataset=args.dataset, repo_id=args.repo_id,
                       license=args.license, overwrite=args.overwrite)
    print(f"bundle ready: {out}\npublish with: nfnet-hub publish {out} --repo-id {args.repo_id}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from .hub import publish

    r = publish(args.bundle, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
                dry_run=args.dry_run)
    if r.get("dry_run"):
        print(f"dry run: would upload {len(r['files'])} files ({r['bytes'] / 1e6:.1f} MB) to {r['repo_id']} "
              f"in one commit: {', '.join(r['files'])}")
    else:
        print(f"published and verified: {r['commit_url']}" + (f" (pull request {r['pr_url']})" if r["pr_url"] else ""))
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from .release import release

    release(args.manifest, out=args.out, dry_run=args.dry_run)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .runtime import OnnxClassifier

    clf = OnnxClassifier.from_pretrained(args.model, filename=args.filename)
    for image, preds in zip(args.images, clf.predict(args.images, top_k=args.top_k)):
        print(image)
        for p in preds:
            print(f"  {p.probability:7.2%}  {p.label}")
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run

    run(args.out, epochs=args.epochs, progress=not args.no_progress)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nfnet-hub", description="Train, export and ship NFNets.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train with timm train.py arguments (see nfnet-hub train --help)", add_help=False)
    sub.add_parser("timm-train", help="run timm's own train.py (PATH ARGS...) with nfnet-hub's AGC", add_help=False)

    s = sub.add_parser("list", help="registered variants with parameters, GMACs, sizes and pretrained tags")
    s.set_defaults(fn=_cmd_list)

    s = sub.add_parser("convert", help="convert the authors' checkpoints to safetensors")
    s.add_argument("source", choices=["deepmind"])
    s.add_argument("checkpoint", help="the authors' FN_haiku.npz")
    s.add_argument("--model", required=True)
    s.add_argument("--num-classes", type=int, default=1000)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_cmd_convert)

    s = sub.add_parser("export", help="fold and export verified ONNX")
    s.add_argument("model")
    s.add_argument("--checkpoint")
    s.add_argument("--img-size", type=int)
    s.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    s.add_argument("--opset", type=int, default=20)
    s.add_argument("--calibration", help="folder of images for int8 calibration")
    s.add_argument("--labels", help="text file with one label per line")
    s.add_argument("--filename", default="model.onnx")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_cmd_export)

    s = sub.add_parser("validate", help="compare an ONNX file with the PyTorch model")
    s.add_argument("onnx")
    s.add_argument("--model", required=True)
    s.add_argument("--checkpoint")
    s.add_argument("--images", help="folder of images (default: random inputs)")
    s.set_defaults(fn=_cmd_validate)

    s = sub.add_parser("bundle", help="build a verified Hub bundle (weights, config, ONNX, card, checksums)")
    s.add_argument("model")
    s.add_argument("--checkpoint")
    s.add_argument("--precision", nargs="*", default=[], choices=["fp16", "int8"], help="extra ONNX precisions")
    s.add_argument("--calibration", help="folder of images for int8 calibration")
    s.add_argument("--labels", help="text file with one label per line")
    s.add_argument("--metrics", help="JSON file with measured top1/top5 for the card")
    s.add_argument("--dataset")
    s.add_argument("--repo-id", default="ORG/NAME", help="used in the card's usage examples")
    s.add_argument("--license", default="apache-2.0")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=_cmd_bundle)

    s = sub.add_parser("publish", help="upload a bundle to the Hub in one commit and verify it")
    s.add_argument("bundle")
    s.add_argument("--repo-id", required=True)
    s.add_argument("--private", action="store_true")
    s.add_argument("--revision")
    s.add_argument("--create-pr", action="store_true")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(fn=_cmd_publish)

    s = sub.add_parser("release", help="build and publish every model of a release manifest")
    s.add_argument("manifest")
    s.add_argument("--out", default="artifacts/release")
    s.add_argument("--dry-run", action="store_true")
    s.set_defaults(fn=_cmd_release)

    s = sub.add_parser("predict", help="classify images with the torch-free ONNX runtime")
    s.add_argument("images", nargs="+")
    s.add_argument("--model", required=True, help="a bundle folder or a Hub repo id ORG/NAME")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--filename", default="model.onnx")
    s.set_defaults(fn=_cmd_predict)

    s = sub.add_parser("quickstart", help="the whole chain on bundled digits, offline, in minutes")
    s.add_argument("--out", default="artifacts/quickstart")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=_cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["timm-train"] and len(argv) > 1:  # timm's own train.py, with our AGC behind --clip-mode agc
        import runpy

        from .agc import patch_timm

        patch_timm()
        sys.argv = argv[1:]
        runpy.run_path(argv[1], run_name="__main__")
        return 0
    if argv[:1] == ["train"]:  # timm's train.py arguments, parsed by the trainer itself
        try:
            return _cmd_train(argv[1:])
        except (ValueError, RuntimeError) as e:
            print(f"nfnet-hub train: error: {e}", file=sys.stderr)
            return 2
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, OSError, RuntimeError, TypeError) as e:
        print(f"nfnet-hub {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
