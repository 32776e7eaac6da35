"""What a run is made of, built as timm's train.py builds it: device and process group, data, model, EMA,
optimiser, learning rate and schedule, loss and mixed precision."""
from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, get_optimizer_info, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ModelEmaV3
from torch import nn

from ..agc import agc_parameters
from ..errors import UsageError
from ..models.checkpoint import (
    checkpoint_form,
    checkpoint_model_args,
    create_model,
    load_checkpoint,
    names_saved_model,
    pretrained_cfg_of,
    read_checkpoint,
)
from ..preprocess import apply_data_config
from .args import DIGITS, noted_options
from .checkpoints import ModelState
from .data import Loaders, check_sizes, create_loaders, input_channels


@dataclass
class Run:
    args: argparse.Namespace
    world: int
    rank: int
    device: torch.device
    owns_group: bool  # this run started the process group and must end it
    loaders: Loaders
    model: nn.Module  # the bare model: checkpoints and EMA read it, never a wrapper
    train_model: nn.Module  # what the forward pass runs: DDP or compiled around the model, or the model itself
    ema: ModelEmaV3 | None
    optimizer: torch.optim.Optimizer
    scheduler: Any
    num_epochs: int
    updates_per_epoch: int
    scaler: torch.amp.GradScaler | None
    autocast: Callable[[], Any]
    criterion: nn.Module
    clip_params: list[nn.Parameter] | None
    states: ModelState

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def progress_bar(self) -> bool:
        """A bar on a terminal; in a log file (nohup, a cluster's job log) a bar would write a line per step for the
        whole run, so train.py's log lines every --log-interval steps instead."""
        return self.main and not self.args.no_progress and sys.stderr.isatty()


def create_ema(model: nn.Module, args: argparse.Namespace) -> ModelEmaV3:
    """timm's EMA, or the authors' (their ``tf1_ema``): decay min(d, (1 + t) / (10 + t)) at update t = 0, 1, ...
    That is timm's warm-up 1 - (1 + s / gamma) ** -power = s / (9 + s) with gamma 9 and power 1, at s = t + 1:
    the loop counts updates from 1, and update_after_step -1 stops timm from copying the first. Over an ImageNet
    run the authors' decay never reaches its cap: a fixed 0.99999 would leave a third of the initial weights in
    the average after F0's 112k steps, and nearly all of them after a short fine-tune."""
    device = "cpu" if args.model_ema_force_cpu else None
    if args.model_ema_authors_warmup:
        if args.model_ema_warmup:
            raise UsageError("--model-ema-warmup and --model-ema-authors-warmup are two warm-ups: choose one")
        return ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=True, warmup_gamma=9.0, warmup_power=1.0,
                          update_after_step=-1, device=device)
    return ModelEmaV3(model, decay=args.model_ema_decay, use_warmup=args.model_ema_warmup, device=device)


def setup_device(args: argparse.Namespace) -> tuple[int, int, torch.device, bool]:
    """World size, rank, device, and whether this call started the process group."""
    for module in args.device_modules or ():
        importlib.import_module(module)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        if rank == 0:
            print(f"note: no CUDA device here (--device {args.device}, train.py's default): training on the CPU"
                  if args.device == "cuda" else f"note: --device {args.device}, but this machine has no CUDA device: "
                  "training on the CPU", flush=True)
        device = torch.device("cpu")
    if device.type == "cuda":  # as train.py: cuDNN picks the fastest convolution per shape, matmuls in TF32
        torch.backends.cudnn.benchmark = torch.backends.cuda.matmul.allow_tf32 = True
        if device.index is None:
            device = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return world, rank, device, True
    return world, rank, device, False


def learning_rate(args: argparse.Namespace, world: int) -> float:
    """``--lr``, else ``--lr-base`` scaled to the global batch (linear, or sqrt for ada* and lamb), as train.py."""
    if args.lr is not None:  # --lr 0 is a learning rate of 0, as in train.py
        return args.lr
    ratio = args.batch_size * world * args.grad_accum_steps / args.lr_base_size
    scale = args.lr_base_scale or ("sqrt" if any(o in args.opt.lower() for o in ("ada", "lamb")) else "linear")
    return args.lr_base * (ratio ** 0.5 if scale == "sqrt" else ratio)


def _classes_in(path: str) -> int:
    """The class count of a checkpoint's classifier (-1 when it cannot be told), for timm's head adaptation."""
    sd = read_checkpoint(path).state_dict
    weight = next((v for k, v in sd.items() if k.endswith(("head.fc.weight", "fc.weight", "classifier.weight"))), None)
    return int(weight.shape[0]) if weight is not None else -1


def take_model_args(args: argparse.Namespace) -> list[str]:
    """The model args the starting weights record (the authors' numerics, a run's --gp and --model-kwargs), made this
    run's where not given: the weights expect them. Written into args, so that args.yaml and checkpoints say so;
    returns them in words for a note."""
    if (path := args.pretrained_path) and checkpoint_form(Path(path)) == "deepmind":  # timm's loader cannot read it
        raise UsageError(f"--pretrained-path {path} is the authors' Haiku checkpoint: convert it first, `nfnet-hub "
                         f"convert deepmind {path} --out {Path(path).stem}.safetensors`, and give that file")
    path = args.initial_checkpoint or args.pretrained_path
    if not path:
        return []
    taken = {k: v for k, v in checkpoint_model_args(path).items()
             if k not in args.model_kwargs and not (k == "global_pool" and args.gp)}
    pool = taken.pop("global_pool", None)
    args.model_kwargs, args.gp = {**args.model_kwargs, **taken}, args.gp or pool
    return [f"{k}={v}" for k, v in {**taken, **({"gp": pool} if pool else {})}.items()]


def _check_betas(args: argparse.Namespace) -> None:
    """--opt-betas of the optimiser's count: timm drops betas an optimiser has none of, and torch's Adam fails on
    one beta with an IndexError."""
    if args.opt_betas is not None:
        try:
            info = get_optimizer_info(args.opt.lower().split("_")[-1])  # lookahead_adamw is adamw's
        except ValueError:  # an --opt timm does not know: creating it says so
            return
        count = info.num_betas if info.has_betas else 0
        if len(args.opt_betas) != count:
            raise UsageError(f"--opt-betas {' '.join(f'{b:g}' for b in args.opt_betas)}: --opt {args.opt} takes "
                             + (f"{count} betas" if count else "no betas"))


def build_model(args: argparse.Namespace, loaders: Loaders) -> nn.Module:
    kwargs: dict[str, Any] = dict(in_chans=input_channels(args), num_classes=args.num_classes or loaders.num_classes,
                                  drop_rate=args.drop, drop_path_rate=args.drop_path, global_pool=args.gp,
                                  scriptable=args.torchscript or None, **args.model_kwargs)
    if args.pretrained_path:  # its classifier is kept where it fits, re-initialised where it does not
        kwargs["pretrained_cfg_overlay"] = dict(file=args.pretrained_path,
                                                num_classes=_classes_in(args.pretrained_path))
    try:
        model = create_model(args.model, pretrained=args.pretrained or bool(args.pretrained_path),
                             **{k: v for k, v in kwargs.items() if v is not None})
    except (TypeError, ValueError) as e:  # a --model-kwargs key the model's constructor does not take, or a value
        if not args.model_kwargs:
            raise
        raise UsageError(f"--model-kwargs {' '.join(f'{k}={v}' for k, v in args.model_kwargs.items())}: {e}") from None
    classifier = model.get_classifier()
    with torch.no_grad():
        if args.head_init_scale is not None:
            classifier.weight.mul_(args.head_init_scale)
            classifier.bias.mul_(args.head_init_scale)
        if args.head_init_bias is not None:
            classifier.bias.fill_(args.head_init_bias)
    # what the weights will expect: recorded in every checkpoint and args.yaml, read by export and bundle
    model.pretrained_cfg = {**apply_data_config(model.pretrained_cfg, loaders.data_config),
                            "num_classes": model.num_classes}
    if args.initial_checkpoint:  # all of it, strictly, as train.py loads it
        if (classes := _classes_in(args.initial_checkpoint)) not in (-1, model.num_classes):
            raise UsageError(f"--initial-checkpoint {args.initial_checkpoint} holds a classifier of {classes} classes, "
                             f"this run's has {model.num_classes}: to fine-tune on these classes, --pretrained-path "
                             f"{args.initial_checkpoint} loads the rest and re-initialises the classifier")
        load_checkpoint(model, args.initial_checkpoint)
    if args.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _criterion(args: argparse.Namespace, mixup: bool) -> nn.Module:
    bce = dict(target_threshold=args.bce_target_thresh, sum_classes=args.bce_sum, pos_weight=args.bce_pos_weight)
    if mixup:  # smoothing is in mixup's soft targets
        return BinaryCrossEntropy(**bce) if args.bce_loss else SoftTargetCrossEntropy()
    if args.smoothing:
        return BinaryCrossEntropy(smoothing=args.smoothing, **bce) if args.bce_loss \
            else LabelSmoothingCrossEntropy(args.smoothing)
    return nn.CrossEntropyLoss()


def _shard(model: nn.Module) -> None:
    """FSDP2: each block is one unit of all-gather, then the rest of the model."""
    from torch.distributed.fsdp import fully_shard

    for stage in model.stages:
        for block in stage:
            fully_shard(block)
    fully_shard(model)


def _note_workers(args: argparse.Namespace, rank: int) -> None:
    """More loader workers than CPUs (train.py's default 4 on a 2-CPU machine): one note, for torch's warning of
    four lines that each loader gives twice."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.dataset == DIGITS or args.workers <= cpus:  # the digits load without workers
        return
    warnings.filterwarnings("ignore", "This DataLoader will create", UserWarning)
    if rank == 0:
        print(f"note: --workers {args.workers} starts more loader processes than this process has CPUs ({cpus}): "
              f"torch warns of slowness or a freeze; --workers {cpus} fits them", flush=True)


def build(args: argparse.Namespace) -> Run:
    world, rank, device, owns_group = setup_device(args)
    if rank == 0:
        for note in noted_options(args):
            print(f"note: {note}", flush=True)
        if args.clip_mode == "agc" and args.clip_grad is None:
            print("warning: --clip-mode agc without --clip-grad clips nothing (as in train.py): give --clip-grad, the "
                  "clipping factor (the authors' 0.01 at batch size 4096; the recipes set it)", flush=True)
    torch.manual_seed(args.seed)  # identical initialisation on every rank
    random.seed(args.seed)
    np.random.seed(args.seed + rank)
    if rank == 0 and names_saved_model(args.model) and not (args.pretrained or args.pretrained_path
                                                             or args.initial_checkpoint or args.resume):
        print(f"note: --model {args.model} without --pretrained: its architecture and preprocessing, not its weights "
              "(as in train.py); add --pretrained to start from them", flush=True)
    model_cfg = {} if args.dataset == DIGITS else pretrained_cfg_of(args.model)  # as timm resolves the data config
    _note_workers(args, rank)
    loaders = create_loaders(args, model_cfg, world, rank, device)
    check_sizes(loaders, args.batch_size, world, args.grad_accum_steps)
    if (taken := take_model_args(args)) and rank == 0:
        source = args.initial_checkpoint or args.pretrained_path
        print(f"note: {args.model} is built with {', '.join(taken)}, as {source} records (its weights expect them; "
              "--gp or --model-kwargs choose others)", flush=True)
    model = build_model(args, loaders).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.torchscript:
        if args.fsdp:
            raise UsageError("--torchscript and --fsdp conflict: FSDP2 shards modules that TorchScript compiles")
        model = torch.jit.script(model)
    ema = create_ema(model, args) if args.model_ema else None
    if args.fsdp:  # before the optimiser: fully_shard replaces the parameters with sharded ones
        if world < 2:
            raise UsageError("--fsdp shards across processes: start it with torchrun --nproc_per_node N (N >= 2)")
        _shard(model)
        if ema is not None:  # sharded alike, so each rank averages its own shards
            _shard(ema.module)
    # as train.py: no decay on 1-d parameters and on what the model names (an NFNet: its gains)
    options = optimizer_kwargs(argparse.Namespace(**{**vars(args), "lr": learning_rate(args, world)}))
    _check_betas(args)
    try:
        optimizer = create_optimizer_v2(model, **options, **args.opt_kwargs)
    except (ValueError, TypeError) as e:  # an --opt timm does not know, or an --opt-kwargs key it does not take
        raise UsageError(f"--opt {args.opt}" + (" with --opt-kwargs" if args.opt_kwargs else "") + f": {e}") from None
    updates_per_epoch = len(loaders.train) // args.grad_accum_steps
    try:
        scheduler, num_epochs = create_scheduler_v2(optimizer, **scheduler_kwargs(args, args.eval_metric == "loss"),
                                                    updates_per_epoch=updates_per_epoch)
    except ValueError as e:  # a --sched timm does not know, or options its schedule cannot follow
        raise UsageError(f"--sched {args.sched}: {e}") from None
    amp_dtype = torch.float16 if args.amp_dtype == "float16" else torch.bfloat16
    scaler = torch.amp.GradScaler(device.type) if args.amp and amp_dtype == torch.float16 \
        and device.type == "cuda" else None
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if args.amp else nullcontext
    train_model = model
    if world > 1 and not args.fsdp:
        no_sync = {"broadcast_buffers": False} if args.no_ddp_bb else {}  # torch 2.14 warns whenever it is passed
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None, **no_sync)
    if args.torchcompile:
        train_model = torch.compile(train_model, backend=args.torchcompile, mode=args.torchcompile_mode)
    clip_params = agc_parameters(model, args.agc_partition) if args.clip_grad and args.clip_mode == "agc" else None
    return Run(args, world, rank, device, owns_group, loaders, model, train_model, ema, optimizer, scheduler,
               num_epochs, updates_per_epoch, scaler, autocast, _criterion(args, loaders.mixup is not None).to(device),
               clip_params, ModelState(args.fsdp))
