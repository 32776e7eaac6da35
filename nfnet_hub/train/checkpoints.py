"""Training checkpoints in the layout timm's train.py writes (``CheckpointSaver``), so that either trainer
resumes the other's: ``state_dict``, ``optimizer``, ``epoch`` (the last finished one) with ``version`` 2,
``arch``, ``args``, ``state_dict_ema``, ``amp_scaler``, ``metric``. Ours add what an exact resumption
needs (``step_in_epoch``, ``global_step``, RNG states, ``best``) and the run's ``data_config``.

Written whole or not at all; under FSDP2 gathered into full tensors, which every rank re-shards on resume.
"""
from __future__ import annotations

import argparse
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.models import clean_state_dict
from torch import nn

from ..errors import CheckpointError, UsageError
from ..models.checkpoint import checkpoint_form, read_pytorch

LAST = "last.pth.tar"
BEST = "model_best.pth.tar"
VERSION = 2  # timm's: "epoch" is the last finished epoch, a resume starts at the next


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write then rename: a kill mid-write never leaves a broken checkpoint behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _restarted() -> bool:
    """torchrun restarted this run after a failure: it continues in its own folder."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def resume_path(args: argparse.Namespace, out_dir: Path) -> Path | None:
    if args.resume == "auto" or (_restarted() and not args.resume):
        return out_dir / LAST if (out_dir / LAST).is_file() else None
    return Path(args.resume) if args.resume else None


def run_files(out_dir: Path) -> list[Path]:
    """What a run writes into its folder that a new run would overwrite or append to."""
    return [p for p in out_dir.glob("*") if p.name in (LAST, BEST, "summary.csv", "args.yaml")
            or (p.name.startswith("checkpoint-") and p.name.endswith(".pth.tar"))]


def check_new_run_folder(out_dir: Path) -> None:
    """A new run never writes over an earlier run's checkpoints and summary. train.py's default folder name
    carries a timestamp, so its runs rarely meet; ours is MODEL-DATASET (so that --resume auto finds it)."""
    if _restarted():
        return
    earlier = sorted(p.name for p in run_files(out_dir))
    if earlier == ["args.yaml"]:
        raise UsageError(f"{out_dir} holds the args.yaml of a run that saved no checkpoint (it stopped in its first "
                         "epoch, or is still there): start afresh in it with --resume auto, or elsewhere with "
                         "--experiment NAME (or --output DIR)")
    if earlier:
        raise UsageError(f"{out_dir} holds an earlier run ({', '.join(earlier)}): continue it with --resume auto, "
                         "or start a new one elsewhere with --experiment NAME (or --output DIR)")


def check_resume_folder(out_dir: Path, path: Path) -> None:
    """A run resumed from a checkpoint goes on in that checkpoint's folder, or in one no other run has written to:
    resuming one run into another's folder (ours is MODEL-DATASET by default) would write over that run's files."""
    if _restarted() or out_dir.resolve() == path.resolve().parent:
        return
    if others := sorted(p.name for p in run_files(out_dir)):
        raise UsageError(f"{out_dir} holds another run ({', '.join(others)}), which resuming {path} would write over: "
                         f"go on in the checkpoint's own folder ({path.parent}: name it with --output and "
                         "--experiment), or in a new one (--experiment NAME)")


def load_training_state(path: str | Path) -> dict[str, Any]:
    """A training checkpoint of this trainer or of timm's train.py (its ``args`` Namespace is admitted)."""
    path = Path(path)
    if checkpoint_form(path) != "pytorch":
        raise CheckpointError(f"{path} holds weights only, not a training checkpoint: resume from a run's "
                              "last.pth.tar, or start from weights with --initial-checkpoint")
    try:
        state = read_pytorch(path)
    except CheckpointError as e:  # a copy cut short, a disk that filled: the run's other checkpoints may be whole
        others = sorted((p for p in path.parent.glob("*.pth.tar") if p.name != path.name),
                        key=lambda p: p.stat().st_mtime, reverse=True)
        hint = (f"; its folder also holds {', '.join(p.name for p in others[:3])} (newest first): --resume "
                f"{others[0]} goes on from the newest") if others else ""
        raise CheckpointError(f"{e}{hint}") from None
    missing = [k for k in ("state_dict", "optimizer", "epoch") if k not in state] if isinstance(state, dict) else None
    if missing is None or missing:
        raise CheckpointError(f"{path} is not a training checkpoint (it lacks "
                              f"{', '.join(missing) if missing else 'everything'}); to start from its weights use "
                              "--initial-checkpoint")
    return state


def saved_args(state: dict[str, Any]) -> dict[str, Any]:
    """The options of the run that wrote a checkpoint: timm's train.py saves a Namespace, we a dict."""
    saved = state.get("args")
    return saved if isinstance(saved, dict) else vars(saved) if saved is not None else {}


def check_resumable(model: nn.Module, state: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """Weights of another model (name, input channels, classes) refused in one line naming the run's own model; so is
    a model built otherwise (--gp, --model-kwargs: the WS form, the activation), which the shapes do not show."""
    from ..models.checkpoint import check_fit, run_model_args

    built, now = ({k: v for k, v in run_model_args(a, timms).items() if (k, v) != ("global_pool", "avg")}  # default
                  for a, timms in ((saved_args(state), isinstance(state.get("args"), argparse.Namespace)),
                                   (vars(args), False)))
    if built != now:
        def flags(kw: dict[str, Any]) -> str:
            pool, rest = kw.get("global_pool"), [f"{k}={v}" for k, v in kw.items() if k != "global_pool"]
            return " ".join(([f"--gp {pool}"] if pool else []) + (["--model-kwargs", *rest] if rest else []))

        was, given = flags(built) or "no --gp or --model-kwargs", flags(now) or "neither"
        raise CheckpointError(f"--resume {path}: its run built the model with `{was}`, this run with `{given}`: "
                              "give the run's own to resume it")
    if args.fsdp:  # a sharded model's own state dict is checked as it loads
        return
    try:
        check_fit(clean_state_dict(state["state_dict"]), model, str(path))
    except CheckpointError as e:
        first = str(e).splitlines()[1].strip()
        first = first if len(first) <= 100 else first[:100] + " ..."
        model_name = saved_args(state).get("model")
        raise CheckpointError(f"--resume {path}: its weights do not fit this run's model ({first}); resume with the "
                              "options of the run that wrote it" + (f" (--model {model_name}, its args.yaml)"
                                                                     if model_name else "")) from None


def start_of(state: dict[str, Any]) -> tuple[int, int]:
    """(epoch, step within it) where a resumed run starts."""
    epoch = state["epoch"] + 1 if state.get("version", 1) > 1 else state["epoch"]
    return epoch, state.get("step_in_epoch", 0)


class ModelState:
    """Checkpoint contents of the model, its EMA and the optimiser.

    Without FSDP these are the plain state dicts timm's train.py writes. Under FSDP2 every rank holds
    shards, so they are gathered into full, unsharded tensors (optimiser state keyed by parameter name)
    on save, and every rank takes its own shards back from them on resume, at any world size.
    """

    def __init__(self, fsdp: bool):
        self.fsdp = fsdp
        if fsdp:
            from torch.distributed.checkpoint import state_dict as dcp

            self.dcp = dcp
            self.gather = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)  # to rank 0's CPU
            self.scatter = dcp.StateDictOptions(full_state_dict=True)  # every rank keeps its own shards

    def model(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return self.dcp.get_model_state_dict(model, options=self.gather) if self.fsdp else model.state_dict()

    def load_model(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.fsdp:
            self.dcp.set_model_state_dict(model, state, options=self.scatter)
        else:
            model.load_state_dict(clean_state_dict(state))

    def optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.dcp.get_optimizer_state_dict(model, optimizer, options=self.gather) if self.fsdp \
            else optimizer.state_dict()

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.fsdp:
            self.dcp.set_optimizer_state_dict(model, optimizer, state, options=self.scatter)
        else:
            optimizer.load_state_dict(state)


class History:
    """The per-epoch checkpoints to keep: the best ``keep`` by the eval metric, as timm's CheckpointSaver
    keeps them, and ``model_best.pth.tar``. What is kept travels in every checkpoint, so a resumed run
    goes on with it."""

    def __init__(self, out_dir: Path, keep: int, decreasing: bool, kept: list | None = None):
        self.out_dir, self.keep, self.decreasing = out_dir, keep, decreasing
        self.kept: list[list] = [[m, name] for m, name in kept or [] if (out_dir / name).is_file()]

    def better(self, metric: float, than: float | None) -> bool:
        return than is None or (metric < than if self.decreasing else metric > than)

    def record(self, epoch: int, metric: float, best: bool) -> list[str]:
        """The files this epoch's checkpoint goes to besides last.pth.tar; removes the ones it pushes out."""
        names = []
        if self.keep:
            name = f"checkpoint-{epoch}.pth.tar"
            ranked = [k for k in self.kept if k[1] != name] + [[metric, name]]
            ranked.sort(key=lambda k: k[0], reverse=not self.decreasing)
            for _, old in ranked[self.keep:]:
                (self.out_dir / old).unlink(missing_ok=True)
            self.kept = ranked[:self.keep]
            names += [name] if [metric, name] in self.kept else []
        return names + ([BEST] if best else [])
