"""The ``nfnet-hub`` command line: parse, call one library function, print.

Every command goes through one handler: a user error (``NfnetHubError``) is printed as one line,
``nfnet-hub <command>: error: ...``, exit 2; Ctrl-C prints one line, exit 130; ``--debug`` (or
``NFNET_HUB_DEBUG=1``) shows the traceback instead. Anything else is a bug and keeps its traceback."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .argtypes import fraction, opset, positive
from .bundle_files import ONNX_FILES
from .errors import NfnetHubError, UsageError, missing_package


def _say_model(model_name: str, args: argparse.Namespace, size: int | None = None, warn_random: bool = True):
    """Load the model the options name, and say where its weights and preprocessing come from."""
    from .models.checkpoint import load_model, names_saved_model
    from .preprocess import Preprocess

    print(f"loading {model_name} ...", flush=True)
    pretrained = getattr(args, "pretrained", False) or args.checkpoint is None and names_saved_model(model_name)
    model, source = load_model(model_name, args.checkpoint, pretrained=pretrained)  # a saved model: its weights
    pre = Preprocess.for_model(model, img_size=size)
    print(f"weights: {source.weights}\npreprocessing: {pre.describe()}, from {source.preprocessing}", flush=True)
    if hasattr(args, "labels"):  # export and bundle
        from .classes import set_class_names, unnamed_classes_note

        if args.labels:
            set_class_names(model, args.labels)
        elif source.classes:
            print(f"classes: {source.classes}; --labels names others", flush=True)
        elif note := unnamed_classes_note(model):
            print(note, flush=True)
    if source.random and warn_random:
        print(f"warning: {model_name} has random weights: its skip gains are zero, so every residual branch "
              "folds away; pass --checkpoint FILE or --pretrained for a model worth exporting", file=sys.stderr)
    return model, pre


def _calibration(args: argparse.Namespace, pre) -> Any:
    from .int8 import load_calibration

    if not args.calibration:
        raise UsageError("int8 needs --calibration DIR (images like the ones the model will see; a fifth of them "
                         "are held out to measure int8's agreement with fp32)")
    return load_calibration(args.calibration, pre, say=lambda line: print(line, flush=True))


def _say_int8(report) -> None:
    if report.int8:
        r = report.int8
        print(f"int8 agrees with fp32 on {r['top1_agreement']:.1%} of {r['held_out_images']} held-out calibration "
              f"images (required: {r['min_agreement']:.0%}" + (", written anyway: --force)" if r["below_threshold"]
                                                                else ")"), flush=True)


def _cmd_list(args: argparse.Namespace) -> int:
    from .models.variants import table

    print(table(markdown=args.markdown))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from .models.convert import convert_authors_checkpoint

    out, name = convert_authors_checkpoint(args.checkpoint, args.model, args.out, num_classes=args.num_classes,
                                           overwrite=args.overwrite, say=lambda line: print(line, flush=True))
    print(f"wrote {out}: the authors' {name}, in their numerics")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .files import check_writable_folder
    from .preprocess import Preprocess, export_size

    args.filename = args.filename or ONNX_FILES[args.precision]
    name = Path(args.filename)
    if name.name != args.filename or name.suffix != ".onnx" or args.filename.startswith("."):
        raise UsageError(f"--filename {args.filename!r} must be a plain file name ending in .onnx; "
                         "--out chooses the folder")
    out = Path(args.out)
    if out.suffix == ".onnx" and not out.is_dir():
        raise UsageError(f"--out {args.out} names a file, but --out is the folder to write into: "
                         f"--out {shlex.quote(str(out.parent))} --filename {shlex.quote(out.name)}")
    check_writable_folder(out)
    model, _ = _say_model(args.model, args, args.img_size)
    size = export_size(model.pretrained_cfg, args.img_size)
    calibration = None
    if args.precision == "int8":
        calibration = _calibration(args, Preprocess.for_model(model, img_size=size))
    print(f"folding, exporting ({args.precision}) and verifying ...", flush=True)
    report = export_onnx(model, out / args.filename, img_size=size, precision=args.precision, opset=args.opset,
                         calibration=calibration, min_agreement=args.min_agreement, force=args.force)
    h, w = report.img_size
    print(f"wrote {report.path}: {report.precision}, opset {report.opset}, {h}x{w} px, "
          f"{report.nodes} nodes, {report.file_bytes / 1e6:.1f} MB; ONNX Runtime vs PyTorch max abs error "
          f"{report.max_abs_error:.3g} (relative {report.max_rel_error:.3g}) at batches {report.verify_batches}")
    _say_int8(report)
    if report.branches_folded_away:
        print(f"warning: {report.branches_folded_away} of {report.blocks} residual branches have a zero skip gain "
              "and were folded away (untrained weights?)", file=sys.stderr)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from .export import validate_onnx
    from .models.checkpoint import check_model_name, names_saved_model
    from .predict import image_progress
    from .preprocess import list_images

    check_model_name(args.model)  # first: a bundle folder's path is told how to name it
    if args.checkpoint is None and not (args.pretrained or args.random_weights or names_saved_model(args.model)):
        raise UsageError("no --checkpoint: comparing the export with a freshly initialised model says nothing; "
                         "pass --checkpoint FILE, --pretrained, a saved model (local-dir:PATH, hf-hub:ORG/NAME), or "
                         "--random-weights if you mean it")
    model, _ = _say_model(args.model, args, warn_random=False)
    r = validate_onnx(args.onnx, model, list_images(args.images) if args.images else None,
                      progress=image_progress("compared"))
    print(f"preprocessing (from {Path(args.onnx).name}'s metadata): {r.preprocessing}")
    print(json.dumps(r.__dict__, indent=2))
    if r.matches is False:
        print(f"nfnet-hub validate: the export differs from the model by {r.max_rel_error:.3g} (relative), more than "
              "its export check allows: it was not exported from these weights (check --model and --checkpoint)",
              file=sys.stderr)
    if r.unreadable:  # as predict: the figures stand for the images read, and a script can tell
        print(f"nfnet-hub validate: {len(r.unreadable)} of {r.inputs + len(r.unreadable)} images left out (unreadable)",
              file=sys.stderr)
    return 1 if r.unreadable or r.matches is False else 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    options = {k: v for k, v in vars(args).items() if k not in ("fn", "command", "debug")}  # the run's own options
    result = train(argparse.Namespace(**options))
    if result["metrics"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"done: top-1 {result['metrics']['top1']:.2f}% after {result['global_step']} steps; "
              f"checkpoints in {result['output']}")
    return 0


def _cmd_timm_train(args: argparse.Namespace) -> int:
    import runpy

    from .agc import patch_timm

    if not Path(args.script).is_file():
        raise UsageError(f"no such file: {args.script} (give the path of timm's train.py)")
    patch_timm()  # timm's --clip-mode agc now runs ours
    sys.argv = [args.script, *args.args]
    runpy.run_path(args.script, run_name="__main__")
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from .cards import read_metrics
    from .files import check_writable_folder
    from .hub import build_bundle, check_replaceable
    from .hubclient import check_repo_id
    from .preprocess import Preprocess, export_size

    check_repo_id(args.repo_id)
    out = Path(args.out)
    check_replaceable(out)  # first: --overwrite would not replace a folder that is not a bundle
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace the bundle there")
    check_writable_folder(out.parent)
    metrics = read_metrics(args.metrics) if args.metrics else None
    model, _ = _say_model(args.model, args, args.img_size)
    size = export_size(model.pretrained_cfg, args.img_size)
    calibration = None
    if "int8" in args.precision:
        calibration = _calibration(args, Preprocess.for_model(model, img_size=size))
    build_bundle(model, out, img_size=size, precisions=["fp32", *args.precision], opset=args.opset,
                 calibration=calibration, metrics=metrics, dataset=args.dataset, repo_id=args.repo_id,
                 license=args.license, overwrite=args.overwrite, min_agreement=args.min_agreement, force=args.force)
    print(f"bundle ready: {out}\npublish with: nfnet-hub publish {shlex.quote(str(out))} --repo-id {args.repo_id}")
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    from .hub import publish

    r = publish(args.bundle, args.repo_id, private=args.private, revision=args.revision, create_pr=args.create_pr,
                dry_run=args.dry_run)
    if r["card_edited"]:
        print("README.md was edited since the bundle was built: the card goes up as edited, with its own checksum")
    if r["card_built_for"]:
        print(f"the model card is uploaded for {r['repo_id']} (the bundle was built for {r['card_built_for']}); "
              "the bundle folder is left as it is")
    if r.get("dry_run"):
        print(f"dry run: would upload {len(r['files'])} files ({r['bytes'] / 1e6:.1f} MB) to {r['repo_id']} "
              f"in one commit: {', '.join(r['files'])}")
    else:
        print(f"published and verified: {r['commit_url']}" + (f" (pull request {r['pr_url']})" if r["pr_url"] else "")
              + f"\nthis version, pinned: {r['repo_id']}@{r['commit']} (for predict, serve, triton and timm's hf-hub:)")
    return 0


def _cmd_release(args: argparse.Namespace) -> int:
    from .release import release

    release(args.manifest, out=args.out, dry_run=args.dry_run, force=args.force)
    return 0


def _cmd_quickstart(args: argparse.Namespace) -> int:
    print("loading torch, timm and scikit-learn's digits ...", flush=True)  # some seconds, said before step 1/4
    from .quickstart import run

    run(args.out, epochs=args.epochs, progress=not args.no_progress)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line form of every other error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _model_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("model", help="model name as timm.create_model takes it (nfnet_hub_f0, nfnet_hub_f0.dm_in1k, "
                   "hf-hub:ORG/NAME, local-dir:PATH)")
    s.add_argument("--checkpoint", help="weights: safetensors, a training checkpoint (.pth.tar) or the authors' .npz")
    s.add_argument("--pretrained", action="store_true", help="load the model's pretrained weights (through timm)")


def _export_options(s: argparse.ArgumentParser) -> None:
    s.add_argument("--img-size", type=positive, help="square input size (default: the size the "
                   "weights were evaluated at, else the model's test size)")
    s.add_argument("--calibration", help="folder of images for int8 calibration")
    s.add_argument("--labels", help="text file with one class name per line, or an ImageNet subset whose names timm "
                   "gives (imagenet-1k, imagenet-22k ...) (default: the names the weights record; a pretrained "
                   "tag's are ImageNet's)")
    s.add_argument("--min-agreement", type=fraction, default=0.95, help="int8's least top-1 agreement with fp32 on "
                   "held-out calibration images")
    s.add_argument("--force", action="store_true", help="write int8 even below --min-agreement (the record says so)")
    s.add_argument("--opset", type=opset, default=20, help="ONNX opset: 20 is the first with a Gelu operator (ONNX "
                   "Runtime 1.17 and later); 17 to 19 write GELU as its formula, for older runtimes")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    from .train.args import DefaultsFormatter, add_arguments

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the traceback of an error (or NFNET_HUB_DEBUG=1)")
    p = _Parser(prog="nfnet-hub", description="Train, export and ship NFNets.")
    p.add_argument("--version", action="version", version=f"nfnet-hub {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    parsers: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, fn, help: str) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help, description=help, parents=[common], formatter_class=DefaultsFormatter)
        s.set_defaults(fn=fn)
        parsers[name] = s
        return s

    add_arguments(command("train", _cmd_train, "train with timm train.py arguments (and --config YAML files)"))

    s = command("timm-train", _cmd_timm_train, "run timm's own train.py with nfnet-hub's AGC behind --clip-mode agc")
    s.add_argument("script", help="path to timm's train.py")
    s.add_argument("args", nargs=argparse.REMAINDER, help="train.py's arguments")

    s = command("list", _cmd_list, "registered variants with parameters, GMACs, sizes, dropout and pretrained tags")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table")

    s = command("convert", _cmd_convert, "convert the authors' Haiku checkpoints to safetensors")
    s.add_argument("source", choices=["deepmind"], help="whose checkpoint")
    s.add_argument("checkpoint", help="the authors' FN_haiku.npz")
    s.add_argument("--model", help="the variant it holds, e.g. nfnet_hub_f0 (default: the one whose shapes it has)")
    s.add_argument("--num-classes", type=positive, help="classes of its classifier (default: its own)")
    s.add_argument("--out", required=True, help="safetensors file to write")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    s = command("export", _cmd_export, "fold and export verified ONNX")
    _model_options(s)
    _export_options(s)
    s.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32", help="ONNX precision")
    s.add_argument("--filename", help="file name inside --out (default: as bundles name them, model.onnx, "
                   "model_fp16.onnx or model_int8.onnx)")
    s.add_argument("--out", required=True, help="folder to write into")

    s = command("validate", _cmd_validate, "compare an ONNX file with the PyTorch model it was exported from")
    s.add_argument("onnx", help="the exported .onnx file")
    s.add_argument("--model", required=True, help="model name (as for export)")
    s.add_argument("--checkpoint", help="the weights it was exported from")
    s.add_argument("--pretrained", action="store_true", help="compare with the model's pretrained weights")
    s.add_argument("--random-weights", action="store_true", help="compare with a freshly initialised model "
                   "(only useful to test the pipeline)")
    s.add_argument("--images", help="folder of images; in folders named after the labels, accuracies are reported "
                   "too (default: random inputs)")

    s = command("bundle", _cmd_bundle, "build a verified Hub bundle (weights, config, ONNX, card, checksums)")
    _model_options(s)
    _export_options(s)
    s.add_argument("--precision", nargs="*", default=[], choices=["fp16", "int8"], help="extra ONNX precisions")
    s.add_argument("--metrics", help="JSON file with measured top1/top5 for the card")
    s.add_argument("--dataset", help="dataset name for the card")
    s.add_argument("--repo-id", default="ORG/NAME", help="the Hub repository, used in the card's examples")
    s.add_argument("--license", default="apache-2.0", help="license for the card")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it is a bundle")
    s.add_argument("--out", required=True, help="bundle folder to create")

    s = command("publish", _cmd_publish, "upload a bundle to the Hub in one commit and verify it")
    s.add_argument("bundle", help="bundle folder")
    s.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub")
    s.add_argument("--private", action="store_true", help="create the repository private")
    s.add_argument("--revision", help="branch to commit to (created if needed)")
    s.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    s.add_argument("--dry-run", action="store_true", help="verify and list what would be uploaded")

    s = command("release", _cmd_release, "build and publish every model of a release manifest")
    s.add_argument("manifest", help="release manifest (TOML), e.g. export/release.toml")
    s.add_argument("--out", default="artifacts/release", help="folder for bundles and the release state")
    s.add_argument("--dry-run", action="store_true", help="build and verify, upload nothing")
    s.add_argument("--force", action="store_true", help="write int8 even below a model's min_agreement (its card "
                   "says so)")

    from .predict import add_predict_arguments, cmd_predict

    add_predict_arguments(command("predict", cmd_predict, "classify images with the torch-free ONNX runtime"))

    from .serve.cli import add_serve_arguments, add_triton_arguments, cmd_serve, cmd_triton

    add_serve_arguments(command("serve", cmd_serve, "serve bundles over the Open Inference Protocol (KServe v2, "
                                "Triton's HTTP API), without torch"))
    add_triton_arguments(command("triton", cmd_triton, "add a model to a Triton Inference Server model repository"))

    s = command("quickstart", _cmd_quickstart, "the whole chain on bundled digits, offline")
    s.add_argument("--out", default="artifacts/quickstart", help="folder for the run, the bundle and the digits")
    s.add_argument("--epochs", type=positive, default=10, help="training epochs")
    s.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    return p, parsers


def _parse(argv: list[str]) -> argparse.Namespace:
    from .train.args import apply_config

    parser, parsers = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's own parser, so the message names the command
        parsers[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "train" and args.config:  # YAML defaults first, then the command line on top
        apply_config(parsers["train"], args.config)
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if getattr(sys.stdout, "errors", None) == "strict":  # a file name in another encoding prints as its bytes, as ls
        sys.stdout.reconfigure(errors="surrogateescape")
    command = next((a for a in argv if not a.startswith("-")), "")
    debug = os.environ.get("NFNET_HUB_DEBUG", "") not in ("", "0") or "--debug" in argv
    try:
        args = _parse(argv)
        command = args.command
        return args.fn(args)
    except NfnetHubError as e:
        if debug:
            raise
        message = " ".join(line.strip() for line in e.message.splitlines() if line.strip())
        print(f"nfnet-hub {command}: error: {message}", file=sys.stderr)
        for detail in e.details:
            print(f"  {detail}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # an extra not installed; any other module missing is a bug
        if debug or (message := missing_package(e.name)) is None:
            raise
        print(f"nfnet-hub {command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"\nnfnet-hub {command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as Unix tools do (128 + SIGPIPE)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit cannot fail
        return 141
    except OSError as e:  # the machine's, not the user's: a full disk, a lost mount
        if debug:
            raise
        print(f"nfnet-hub {command}: error: {str(e) or type(e).__name__} (run with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
