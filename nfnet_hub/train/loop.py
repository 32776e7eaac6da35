"""The training loop, split as timm's train.py splits it: resume, train_one_epoch, validate, and the
optimiser step (unscale -> clip the all-reduced gradient -> step -> EMA) as one function.

No host sync per micro-step: losses add up on the device and are read at log points, before every
checkpoint and at the end of each epoch, which is also where a NaN or infinite loss stops the run
(the last checkpoint written is one whose losses were all finite).
"""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from timm.utils import ModelEmaV3, accuracy, dispatch_clip_grad
from torch import nn

from ..agc import adaptive_clip_grad_
from ..errors import TrainingError
from ..models.checkpoint import check_model_name
from ..preprocess import DEFAULT_MODES, IMAGE_MODE
from .args import check_args
from .build import Run, build, learning_rate
from .checkpoints import (
    LAST,
    VERSION,
    History,
    check_new_run_folder,
    check_resumable,
    check_resume_folder,
    load_training_state,
    resume_path,
    rng_state,
    save_checkpoint,
    saved_args,
    set_rng_state,
    start_of,
)


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunFinished(TrainingError):
    """The checkpoint to resume has trained every epoch asked for."""


def optimizer_step(optimizer: torch.optim.Optimizer, model: nn.Module, *, scaler: torch.amp.GradScaler | None = None,
                   clip_grad: float | None = None, clip_mode: str = "agc", clip_params: list | None = None,
                   ema: ModelEmaV3 | None = None, step: int = 0) -> None:
    """One update from the accumulated gradient, which DDP has already all-reduced: unscale it (mixed
    precision), clip it (AGC: unit-wise, against the true gradient), step (the scaler skips a step whose
    gradient is not finite), clear the gradients, then update the EMA."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        if clip_mode == "agc":
            adaptive_clip_grad_(clip_params if clip_params is not None else list(model.parameters()), clip_grad)
        else:
            dispatch_clip_grad(model.parameters(), clip_grad, mode=clip_mode)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update(model, step=step)


@torch.no_grad()
def validate(model: nn.Module, run: Run) -> dict[str, float]:
    """Loss, top-1 and top-5 over the validation set (all processes together)."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=run.device)
    for x, y in run.loaders.val:
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with run.autocast():
            logits = model(x)
        logits = logits.float()
        top1, top5 = accuracy(logits, y, topk=(1, min(5, logits.shape[-1])))
        n = x.shape[0]
        totals += torch.stack([nn.functional.cross_entropy(logits, y) * n, top1 * n / 100, top5 * n / 100,
                               torch.tensor(float(n), device=run.device)]).double()
    if run.world > 1:
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, out_dir: Path) -> None:
    if not torch.isfinite(loss_sum).item():
        raise TrainingDiverged(f"the loss became {loss_sum.item()} by epoch {epoch}, step {step}: stopping; the last "
                               f"good checkpoint is kept in {out_dir}")


def train_one_epoch(run: Run, epoch: int, step_in_epoch: int, global_step: int, out_dir: Path,
                    save_recovery) -> tuple[float, int]:
    """One epoch from ``step_in_epoch`` on; returns the mean training loss and the global step after it."""
    args, loaders = run.args, run.loaders
    run.train_model.train()
    if hasattr(loaders.shuffler, "set_epoch"):
        loaders.shuffler.set_epoch(epoch)  # the same order after a resume
    if loaders.mixup is not None and args.mixup_off_epoch and epoch >= args.mixup_off_epoch:
        loaders.mixup.mixup_enabled = False
    accum = args.grad_accum_steps
    batches = itertools.islice(iter(loaders.train), step_in_epoch * accum, run.updates_per_epoch * accum)
    progress = None
    if run.progress_bar:
        from tqdm import tqdm
        progress = tqdm(total=run.updates_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch}", leave=False)
    loss_sum, loss_n, seen, tick, shown = torch.zeros((), device=run.device), 0, 0, time.perf_counter(), 0.0
    for micro, (x, y) in enumerate(batches):
        if not loaders.on_device:
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if loaders.mixup_on_batches:
            x, y = loaders.mixup(x, y)
        last_micro = (micro + 1) % accum == 0
        no_sync = not last_micro and hasattr(run.train_model, "no_sync")
        with run.train_model.no_sync() if no_sync else nullcontext():  # all-reduce on the last micro-step
            with run.autocast():
                loss = run.criterion(run.train_model(x), y)
            (run.scaler.scale(loss / accum) if run.scaler is not None else loss / accum).backward()
        loss_sum, loss_n, seen = loss_sum + loss.detach().float(), loss_n + 1, seen + x.shape[0] * run.world
        if not last_micro:
            continue
        optimizer_step(run.optimizer, run.model, scaler=run.scaler, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                       clip_params=run.clip_params, ema=run.ema, step=global_step + 1)  # train.py's count
        global_step, step_in_epoch = global_step + 1, step_in_epoch + 1
        if args.sched_on_updates:
            run.scheduler.step_update(global_step)
        if args.synchronize_step and run.device.type == "cuda":
            torch.cuda.synchronize(run.device)
        now = time.perf_counter()
        if progress is not None:
            progress.update(1)
            if now - shown >= 1.0:  # reading the loss syncs the device: about once a second
                shown = now
                lr = run.optimizer.param_groups[0]["lr"]
                progress.set_postfix(loss=f"{loss_sum.item() / loss_n:.3f}", lr=f"{lr:.3g}",
                                     img_s=f"{seen / (now - tick):.0f}")
        elif run.main and args.log_interval and step_in_epoch % args.log_interval == 0:
            print(f"epoch {epoch} step {step_in_epoch}/{run.updates_per_epoch} loss {loss_sum.item() / loss_n:.4f} "
                  f"lr {run.optimizer.param_groups[0]['lr']:.4g} {seen / (now - tick):.0f} img/s", flush=True)
        if args.recovery_interval and global_step % args.recovery_interval == 0:
            _check_finite(loss_sum, epoch, global_step, out_dir)
            save_recovery(epoch, step_in_epoch, global_step)
    if progress is not None:
        progress.close()
    _check_finite(loss_sum, epoch, global_step, out_dir)
    return loss_sum.item() / max(loss_n, 1), global_step


def resume(run: Run, state: dict[str, Any], path: Path) -> tuple[int, int, int, float | None, list | None]:
    """Restore what a checkpoint holds (ours or timm's train.py's) and put the schedule where it stopped.
    Returns the start epoch, the step within it, the global step, the best metric and the kept history."""
    args = run.args
    check_resumable(run.model, state, path, args)
    run.states.load_model(run.model, state["state_dict"])
    if not args.no_resume_opt:
        run.states.load_optimizer(run.model, run.optimizer, state["optimizer"])
        scaler_state = state.get("amp_scaler", state.get("scaler"))
        if run.scaler is not None and scaler_state is not None:
            run.scaler.load_state_dict(scaler_state)
    if run.ema is not None and "state_dict_ema" in state:
        run.states.load_model(run.ema.module, state["state_dict_ema"])
    epoch, step = start_of(state)
    if args.start_epoch is not None:
        epoch, step = args.start_epoch, 0
    global_step = state.get("global_step", epoch * run.updates_per_epoch + step) if args.start_epoch is None \
        else epoch * run.updates_per_epoch
    if "rng" in state:
        set_rng_state(state["rng"][run.rank] if run.rank < len(state["rng"]) else state["rng"][0])
    if epoch >= run.num_epochs:
        raise RunFinished(f"nothing to train: {path} has finished {epoch} of {run.num_epochs} epochs; pass "
                          f"--epochs N with N > {epoch} to train on (the schedule is stretched to N)")
    if run.main:
        for line in _data_changes(state.get("data_config"), run.loaders.data_config, path):
            print(f"warning: {line}", flush=True)
        if line := _recipe_changes(saved_args(state), args, path, learning_rate(args, run.world)):
            print(f"warning: {line}", flush=True)
    if args.sched_on_updates:
        run.scheduler.step_update(global_step)
    else:
        run.scheduler.step(epoch)
    if all(group["lr"] <= 0 for group in run.optimizer.param_groups):
        raise TrainingError(f"resumed at epoch {epoch} where the schedule's learning rate is 0, so the run cannot "
                            "learn: raise --epochs, --lr or --min-lr")
    before = saved_args(state).get("epochs")
    if run.main:
        if before and before != args.epochs:
            print(f"the schedule now runs to epoch {args.epochs} (the checkpoint's run was for {before})", flush=True)
        print(f"resumed from {path}: epoch {epoch}, step {global_step}" + (", its weights over the starting ones (as "
              "train.py)" if args.initial_checkpoint or args.pretrained_path else ""), flush=True)
    return epoch, step, global_step, state.get("best"), state.get("history")


def _data_changes(before: dict[str, Any] | None, now: dict[str, Any], path: Path) -> list[str]:
    """How the data a resumed run reads differ from those its checkpoint was trained on (timm resumes without a
    word): other classes under the same count, another input size or normalisation."""
    if not before:  # timm's checkpoints record none
        return []

    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    changed = [(k, plain(before[k]), plain(now.get(k))) for k in ("label_names", "input_size", "mean", "std",
                                                                  "crop_pct", "crop_mode", "interpolation")
               if k in before and before[k] is not None and plain(before[k]) != plain(now.get(k))]
    mode = lambda cfg: cfg.get(IMAGE_MODE) or DEFAULT_MODES.get(cfg["input_size"][0])  # noqa: E731
    if "input_size" in before and mode(before) != mode(now):  # the pixels themselves differ
        changed.append(("image mode", mode(before), mode(now)))
    return [f"{path} was trained on classes {_brief(old)}; the data now have {_brief(new)}: the resumed run "
            "relabels what the model learnt" if k == "label_names" else
            f"{path} was trained with {k} {old}; this run uses {new}" for k, old, new in changed]


_RECIPE = ("opt", "lr", "lr_base", "batch_size", "momentum", "weight_decay", "clip_mode", "clip_grad")


def _recipe_changes(before: dict[str, Any], args: argparse.Namespace, path: Path, lr: float) -> str:
    """The optimisation options a resumed run changes: a resume takes the options given now, as in train.py, so a
    run resumed without its own (an NFNet that trained under AGC and resumes without it can diverge) is said.
    train.py saves the learning rate it resolved from --lr-base as --lr: the same rate is no change."""
    same_lr = isinstance(before.get("lr"), float | int) and math.isclose(before["lr"], lr, rel_tol=1e-9)
    changed = [k for k in _RECIPE if k in before and before[k] != getattr(args, k) and not (k == "lr" and same_lr)]
    if not changed:
        return ""
    shown = lambda options: ", ".join(f"--{k.replace('_', '-')} {options(k)}" for k in changed)  # noqa: E731
    run_args = path.parent / "args.yaml"
    again = f"--config {run_args}" if run_args.is_file() else "its options"
    return (f"{path}'s run trained with {shown(before.get)}; this run with {shown(lambda k: getattr(args, k))} "
            f"(a resumed run takes the options given now, as train.py's does: to resume the run as it was, give "
            f"{again})")


def _brief(names: list | None) -> str:
    return "(none recorded)" if not names else ", ".join(map(str, names[:6])) + (" ..." if len(names) > 6 else "")


def _wandb(args: argparse.Namespace):
    if not args.log_wandb:
        return None
    try:
        import wandb
    except ImportError:
        print("note: --log-wandb, but wandb is not installed (pip install wandb): not logging to wandb", flush=True)
        return None
    return wandb.init(project=args.wandb_project, config=vars(args), tags=args.wandb_tags or None,
                      id=args.wandb_resume_id or None, resume="must" if args.wandb_resume_id else None)


def default_experiment(args: argparse.Namespace) -> str:
    """MODEL-DATASET as one folder name, made safe as train.py makes the model's (``local-dir:runs/best`` and
    ``hfds/org/name`` hold slashes and colons): without train.py's timestamp, so --resume auto finds it again."""
    from timm.models import safe_model_name

    return f"{safe_model_name(args.model)}-{safe_model_name(args.dataset, remove_source=False) or 'folder'}"


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the final evaluation and where the checkpoints are."""
    check_args(args)
    check_model_name(args.model, "--initial-checkpoint")  # a run's folder, a weights file ...: said before any work
    out_dir = Path(args.output or "output/train") / (args.experiment or default_experiment(args))
    path = resume_path(args, out_dir)
    state = load_training_state(path) if path is not None else None  # read before any work: errors come first
    if state is None and args.resume != "auto":  # auto: the folder is this run's, whatever it holds
        check_new_run_folder(out_dir)
    elif state is not None and args.resume != "auto":
        check_resume_folder(out_dir, path)
    run = build(args)
    args = run.args
    start_epoch, step_in_epoch, global_step, best, kept = 0, 0, 0, None, None
    if state is not None:
        try:
            start_epoch, step_in_epoch, global_step, best, kept = resume(run, state, path)
        except RunFinished as done:
            if args.resume not in ("auto", ""):  # an explicit --resume FILE meant to train on
                raise
            # --resume auto (or a torchrun restart) of a finished run: done already, as train.py 1.0.31 has it
            if run.main:
                print(f"{done.message}; --resume auto leaves it as it is", flush=True)
            _leave(run)
            return {"metrics": {}, "output": str(out_dir), "global_step": state.get("global_step"),
                    "best_top1": state.get("best"), "model": run.model}
    elif args.start_epoch is not None:  # as train.py: start the schedule there
        start_epoch, global_step = args.start_epoch, args.start_epoch * run.updates_per_epoch
        run.scheduler.step(start_epoch)
    if run.main and args.warmup_epochs >= run.num_epochs:
        print(f"warning: --warmup-epochs {args.warmup_epochs} covers all {run.num_epochs} epochs: the learning rate "
              "never leaves warm-up, so the run will barely learn", flush=True)
    if run.main and run.ema is not None and not (args.model_ema_warmup or args.model_ema_authors_warmup):
        updates = run.num_epochs * run.updates_per_epoch
        initial = args.model_ema_decay ** updates  # the initial weights' share of the average at the end
        if initial > 0.05:
            print(f"warning: --model-ema-decay {args.model_ema_decay:g} without a warm-up leaves {initial:.0%} of the "
                  f"initial weights in the EMA after the run's {updates} updates, and the EMA is what is evaluated "
                  "and saved: add --model-ema-authors-warmup (or --model-ema-warmup), or lower the decay", flush=True)
    history = History(out_dir, args.checkpoint_hist, args.eval_metric == "loss", kept)
    wandb_run = _wandb(args) if run.main else None
    if run.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.yaml").write_text(yaml.safe_dump({**vars(args), "data_config": run.loaders.data_config},
                                                          sort_keys=True))

    def checkpoint(epoch: int, step: int, metric: float | None) -> dict[str, Any]:
        rngs = [None] * run.world
        if run.world > 1:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        plain = (int, float, str, bool, list, dict, type(None))
        ckpt = {"state_dict": run.states.model(run.model), "optimizer": run.states.optimizer(run.model, run.optimizer),
                "epoch": epoch - 1, "version": VERSION, "arch": args.model,
                "args": {k: v for k, v in vars(args).items() if isinstance(v, plain)},
                "step_in_epoch": step, "global_step": global_step, "best": best, "rng": rngs, "metric": metric,
                "data_config": run.loaders.data_config, "history": history.kept}
        if run.ema is not None:
            ckpt["state_dict_ema"] = run.states.model(run.ema.module)
        if run.scaler is not None:
            ckpt["amp_scaler"] = run.scaler.state_dict()
        return ckpt

    def save_recovery(epoch: int, step: int, at_step: int) -> None:
        nonlocal global_step
        global_step = at_step
        ckpt = checkpoint(epoch, step, None)
        if run.main:
            save_checkpoint(out_dir / LAST, ckpt)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, run.num_epochs):
        train_loss, global_step = train_one_epoch(run, epoch, step_in_epoch, global_step, out_dir, save_recovery)
        step_in_epoch = 0
        last = epoch + 1 == run.num_epochs
        names: list[str] = []
        evaluated = (epoch + 1) % args.val_interval == 0 or last
        if evaluated:
            metrics = validate(run.train_model, run)
            if run.ema is not None and not args.model_ema_force_cpu:  # as train.py: both, and the EMA's count
                metrics = {**validate(run.ema.module, run), "model_top1": metrics["top1"]}
            metric = metrics[args.eval_metric]
            improved = history.better(metric, best)
            best = metric if improved else best
            names = history.record(epoch, metric, improved)
        lrs = [group["lr"] for group in run.optimizer.param_groups]  # the rate the epoch ended on, as train.py
        run.scheduler.step(epoch + 1, metrics.get(args.eval_metric))
        ckpt = checkpoint(epoch + 1, 0, metrics.get(args.eval_metric) if evaluated else None)
        if run.main:
            for name in [LAST, *names]:
                save_checkpoint(out_dir / name, ckpt)
            if evaluated:  # every evaluated epoch, after its checkpoint: a resumed run never repeats a row
                _report_epoch(out_dir, epoch, train_loss, metrics, sum(lrs) / len(lrs), wandb_run)
    if wandb_run is not None:
        wandb_run.finish()
    _leave(run)
    return {"metrics": metrics, "output": str(out_dir), "global_step": global_step, "best_top1": best,
            "model": run.model}


def _leave(run: Run) -> None:
    if run.owns_group:
        dist.barrier()  # leave together: a rank exiting while another still talks to gloo can abort
        dist.destroy_process_group()


def _report_epoch(out_dir: Path, epoch: int, train_loss: float, metrics: dict[str, float], lr: float,
                  wandb_run: Any) -> None:
    """One evaluated epoch: a row of summary.csv, a line on the console, wandb if it logs."""
    _append_summary(out_dir / "summary.csv", epoch, train_loss, metrics, lr)
    ema = f" (EMA; the model's top-1 {metrics['model_top1']:.2f}%)" if "model_top1" in metrics else ""
    print(f"epoch {epoch}: train loss {train_loss:.4f}, eval loss {metrics['loss']:.4f}, "
          f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%{ema}", flush=True)
    if wandb_run is not None:
        wandb_run.log({"epoch": epoch, "train_loss": train_loss, "lr": lr,
                       **{f"eval_{k}": v for k, v in metrics.items()}})


def _append_summary(path: Path, epoch: int, train_loss: float, metrics: dict[str, float], lr: float) -> None:
    """timm's summary.csv columns."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"])
        w.writerow([epoch, train_loss, metrics["loss"], metrics["top1"], metrics["top5"], lr])
