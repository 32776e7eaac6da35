"""The training loop: one process or torchrun (DDP over NCCL/gloo, or FSDP2), AGC after the
all-reduce and after unscaling, atomic checkpoints and exact resumption."""
from __future__ import annotations

import argparse
import csv
import itertools
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, dispatch_clip_grad
from torch import nn

from ..agc import adaptive_clip_grad_, agc_parameters
from ..errors import TrainingError
from ..models.checkpoint import create_model, load_checkpoint, load_training_state
from ..preprocess import apply_data_config
from .args import DIGITS, check_args
from .data import check_sizes, create_loaders

CHECKPOINT = "last.pth.tar"


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _setup_distributed(args: argparse.Namespace) -> tuple[int, int, torch.device, bool]:
    """World size, rank, device, and whether this call started the process group (and must end it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return world, rank, device, True
    return world, rank, device, False


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """The authors apply no weight decay to gains and biases."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name.endswith("gain") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write then rename: a kill mid-write never leaves a broken checkpoint behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def _resume_path(args: argparse.Namespace, out_dir: Path) -> Path | None:
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    if args.resume == "auto" or (restarted and not args.resume):
        return out_dir / CHECKPOINT if (out_dir / CHECKPOINT).is_file() else None
    return Path(args.resume) if args.resume else None


def _shard(model: nn.Module) -> None:
    """FSDP2: each block is one unit of all-gather, then the rest of the model."""
    from torch.distributed.fsdp import fully_shard

    for stage in model.stages:
        for block in stage:
            fully_shard(block)
    fully_shard(model)


class _State:
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
            model.load_state_dict(state)

    def optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return self.dcp.get_optimizer_state_dict(model, optimizer, options=self.gather) if self.fsdp \
            else optimizer.state_dict()

    def load_optimizer(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if self.fsdp:
            self.dcp.set_optimizer_state_dict(model, optimizer, state, options=self.scatter)
        else:
            optimizer.load_state_dict(state)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, world: int) -> dict[str, float]:
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        top1, top5 = accuracy(logits, y, topk=(1, min(5, logits.shape[-1])))
        n = x.shape[0]
        totals += torch.tensor([nn.functional.cross_entropy(logits, y).item() * n, top1.item() * n / 100,
                                top5.item() * n / 100, n], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(totals)
    loss, top1, top5, n = totals.tolist()
    return {"loss": loss / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as ``args`` says; returns the final evaluation and where the checkpoints are."""
    check_args(args)
    out_dir = Path(args.output) / (args.experiment or f"{args.model}-{args.dataset or 'folder'}")
    resume = _resume_path(args, out_dir)
    ckpt = load_training_state(resume) if resume is not None else None  # read before any work: errors come first
    world, rank, device, owns_group = _setup_distributed(args)
    main_process = rank == 0
    torch.manual_seed(args.seed)  # identical initialisation on every rank
    random.seed(args.seed)
    np.random.seed(args.seed + rank)

    model_kw = {k: v for k, v in dict(drop_rate=args.drop, drop_path_rate=args.drop_path).items() if v is not None}
    data_cfg = {}
    if args.dataset != DIGITS:  # the model's preprocessing, without building the model twice
        from timm.models import get_pretrained_cfg
        cfg = get_pretrained_cfg(args.model.partition(".")[0])
        data_cfg = cfg.to_dict() if cfg is not None else {}
    loaders = create_loaders(args, data_cfg, world, rank)
    check_sizes(loaders, args.batch_size, world, args.grad_accum_steps)
    model = create_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes or loaders.num_classes,
                         **model_kw)
    # what the weights will expect: recorded in every checkpoint and args.yaml, read by export and bundle
    model.pretrained_cfg = {**apply_data_config(model.pretrained_cfg, loaders.data_config),
                            "num_classes": model.num_classes}
    if args.initial_checkpoint:
        load_checkpoint(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=args.model_ema_decay) if args.model_ema else None
    if args.fsdp:  # before the optimiser: fully_shard replaces the parameters with sharded ones
        if world < 2:
            raise ValueError("--fsdp shards across processes: start it with torchrun --nproc_per_node N (N >= 2)")
        _shard(model)
        if ema is not None:  # sharded alike, so each rank averages its own shards
            _shard(ema.module)
    states = _State(args.fsdp)
    clip_params = agc_parameters(model, args.agc_partition) if args.clip_grad and args.clip_mode == "agc" else None

    global_batch = args.batch_size * world * args.grad_accum_steps
    lr = args.lr or args.lr_base * global_batch / args.lr_base_size
    opt_kw = {"eps": args.opt_eps} if args.opt_eps else {}
    optimizer = create_optimizer_v2(_param_groups(model, args.weight_decay), opt=args.opt, lr=lr,
                                    weight_decay=args.weight_decay, momentum=args.momentum, **opt_kw)
    updates_per_epoch = len(loaders.train) // args.grad_accum_steps
    scheduler, num_epochs = create_scheduler_v2(optimizer, sched=args.sched, num_epochs=args.epochs,
                                                warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr,
                                                min_lr=args.min_lr, step_on_epochs=not args.sched_on_updates,
                                                updates_per_epoch=updates_per_epoch)
    amp_dtype = torch.float16 if args.amp_dtype == "float16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if args.amp and amp_dtype == torch.float16 else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else nullcontext
    mixup = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, prob=args.mixup_prob,
                  switch_prob=args.mixup_switch_prob, label_smoothing=args.smoothing,
                  num_classes=loaders.num_classes) if args.mixup > 0 or args.cutmix > 0 else None
    criterion = SoftTargetCrossEntropy() if mixup else (
        LabelSmoothingCrossEntropy(args.smoothing) if args.smoothing else nn.CrossEntropyLoss())

    train_model = model  # model stays the bare module: checkpoints and EMA read it, never a wrapper
    if world > 1 and not args.fsdp:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    if args.torchcompile:
        train_model = torch.compile(train_model, backend=args.torchcompile)

    start_epoch, step_in_epoch, global_step, best = 0, 0, 0, None
    if ckpt is not None:
        states.load_model(model, ckpt["state_dict"])
        states.load_optimizer(model, optimizer, ckpt["optimizer"])
        if ema is not None and "state_dict_ema" in ckpt:
            states.load_model(ema.module, ckpt["state_dict_ema"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step_in_epoch, global_step = ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"]
        best = ckpt.get("best")
        _set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        _position_schedule(scheduler, args, resume, ckpt, start_epoch, num_epochs, global_step, optimizer)
        if main_process:
            print(f"resumed from {resume}: epoch {start_epoch}, step {global_step}", flush=True)
    if main_process and args.warmup_epochs >= num_epochs:
        print(f"warning: --warmup-epochs {args.warmup_epochs} covers all {num_epochs} epochs: the learning rate never "
              "leaves warm-up, so the run will barely learn", flush=True)
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "args.yaml").write_text(yaml.safe_dump({**vars(args), "data_config": loaders.data_config},
                                                          sort_keys=True))

    def checkpoint_state(epoch: int, step_in_epoch: int) -> dict[str, Any]:
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        state = {"state_dict": states.model(model), "optimizer": states.optimizer(model, optimizer),
                 "scheduler": scheduler.state_dict(), "epoch": epoch, "step_in_epoch": step_in_epoch,
                 "global_step": global_step, "best": best, "rng": rngs, "arch": args.model,
                 "data_config": loaders.data_config,
                 "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}}
        if ema is not None:
            state["state_dict_ema"] = states.model(ema.module)
        if scaler is not None:
            state["scaler"] = scaler.state_dict()
        return state

    def save(epoch: int, step_in_epoch: int, extra: tuple[str, ...] = ()) -> None:
        state = checkpoint_state(epoch, step_in_epoch)
        if main_process:
            save_checkpoint(out_dir / CHECKPOINT, state)
            for name in extra:
                save_checkpoint(out_dir / name, state)

    metrics: dict[str, float] = {}
    for epoch in range(start_epoch, num_epochs):
        train_model.train()
        if hasattr(loaders.shuffler, "set_epoch"):
            loaders.shuffler.set_epoch(epoch)  # the same order after a resume
        batches = itertools.islice(iter(loaders.train), step_in_epoch * args.grad_accum_steps,
                                   updates_per_epoch * args.grad_accum_steps)
        progress = None
        if main_process and not args.no_progress:
            from tqdm import tqdm
            progress = tqdm(total=updates_per_epoch, initial=step_in_epoch, desc=f"epoch {epoch}", leave=False)
        loss_sum, loss_n, seen, tick = 0.0, 0, 0, time.perf_counter()
        for micro, (x, y) in enumerate(batches):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mixup is not None:
                x, y = mixup(x, y)
            last_micro = (micro + 1) % args.grad_accum_steps == 0
            sync = nullcontext() if last_micro or not hasattr(train_model, "no_sync") else train_model.no_sync()
            with sync:
                with autocast():
                    loss = criterion(train_model(x), y)
                if not math.isfinite(loss.item()):
                    raise TrainingDiverged(f"loss is {loss.item()} at epoch {epoch}, step {global_step}: stopping; "
                                           f"the last good checkpoint is kept in {out_dir}")
                scaled = loss / args.grad_accum_steps
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
            loss_sum, loss_n, seen = loss_sum + loss.item(), loss_n + 1, seen + x.shape[0] * world
            if not last_micro:
                continue
            # the gradient seen here is the all-reduced, accumulated one; unscale before clipping
            if scaler is not None:
                scaler.unscale_(optimizer)
            finite = scaler is None or all(torch.isfinite(g).all() for g in
                                           torch._foreach_norm([p.grad for p in model.parameters()
                                                                if p.grad is not None]))
            if args.clip_grad and finite:
                if clip_params is not None:
                    adaptive_clip_grad_(clip_params, args.clip_grad)
                else:
                    dispatch_clip_grad(model.parameters(), args.clip_grad, mode=args.clip_mode)
            if scaler is not None:
                scaler.step(optimizer)  # skips the step on inf/nan gradients
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step=global_step)
            global_step, step_in_epoch = global_step + 1, step_in_epoch + 1
            if args.sched_on_updates:
                scheduler.step_update(global_step)
            lr_now = optimizer.param_groups[0]["lr"]
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_sum / loss_n:.3f}", lr=f"{lr_now:.3g}",
                                     img_s=f"{seen / (time.perf_counter() - tick):.0f}")
            elif main_process and args.log_interval and global_step % args.log_interval == 0:
                rate = seen / (time.perf_counter() - tick)
                print(f"epoch {epoch} step {step_in_epoch}/{updates_per_epoch} loss {loss_sum / loss_n:.4f} "
                      f"lr {lr_now:.4g} {rate:.0f} img/s", flush=True)
            if args.recovery_interval and global_step % args.recovery_interval == 0:
                save(epoch, step_in_epoch)
        if progress is not None:
            progress.close()
        step_in_epoch = 0
        scheduler.step(epoch + 1)
        metrics = evaluate(ema.module if ema is not None else train_model, loaders.val, device, world)
        improved = best is None or metrics["top1"] > best
        best = metrics["top1"] if improved else best
        hist = (f"checkpoint-{epoch}.pth.tar",) if args.checkpoint_hist else ()
        save(epoch + 1, 0, hist + (("model_best.pth.tar",) if improved else ()))
        if main_process:
            for old in sorted(out_dir.glob("checkpoint-*.pth.tar"), key=lambda p: int(p.stem.split("-")[1][:-4]))[
                    :-args.checkpoint_hist or None]:
                old.unlink()
            _append_summary(out_dir / "summary.csv", epoch, loss_sum / max(loss_n, 1), metrics,
                            optimizer.param_groups[0]["lr"])
            print(f"epoch {epoch}: train loss {loss_sum / max(loss_n, 1):.4f}, eval loss {metrics['loss']:.4f}, "
                  f"top-1 {metrics['top1']:.2f}%, top-5 {metrics['top5']:.2f}%", flush=True)
    if owns_group:
        dist.barrier()  # leave together: a rank exiting while another still talks to gloo can abort
        dist.destroy_process_group()
    return {"metrics": metrics, "output": str(out_dir), "global_step": global_step, "best_top1": best,
            "model": model}


def _position_schedule(scheduler, args: argparse.Namespace, resume: Path, ckpt: dict[str, Any], start_epoch: int,
                       num_epochs: int, global_step: int, optimizer: torch.optim.Optimizer) -> None:
    """Continue the schedule of this run's ``--epochs`` where the checkpoint stopped (as timm's train.py
    does): a longer run extends the schedule rather than restoring the finished one."""
    if start_epoch >= num_epochs:
        raise TrainingError(f"nothing to train: {resume} has finished {start_epoch} of {num_epochs} epochs; "
                            f"pass --epochs N with N > {start_epoch} to train on (the schedule is stretched to N)")
    if args.sched_on_updates:
        scheduler.step_update(global_step)
    else:
        scheduler.step(start_epoch)
    if all(group["lr"] <= 0 for group in optimizer.param_groups):
        raise TrainingError(f"resumed at epoch {start_epoch} where the schedule's learning rate is 0, so the run "
                            "cannot learn: raise --epochs, --lr or --min-lr")
    before = (ckpt.get("args") or {}).get("epochs")
    if before and before != args.epochs and int(os.environ.get("RANK", "0")) == 0:
        print(f"the schedule now runs to epoch {args.epochs} (the checkpoint's run was for {before})", flush=True)


def _append_summary(path: Path, epoch: int, train_loss: float, metrics: dict[str, float], lr: float) -> None:
    """timm's summary.csv columns."""
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"])
        w.writerow([epoch, train_loss, metrics["loss"], metrics["top1"], metrics["top5"], lr])
