"""The values train.py's options may take: a config file's values typed as the command line types them, and the
ranges outside which a run cannot be what was asked (train.py checks neither: its runs fail later, with a
traceback from deep inside timm or torch, or train on nonsense)."""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

from ..errors import UsageError


def typed_config(parser: argparse.ArgumentParser, cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """``cfg``'s values as the command line would give them (YAML's ``lr: "0.1"`` a float, ``epochs: 10.5``
    refused), one line per bad value."""
    actions = {a.dest: a for a in parser._actions}
    typed, problems = {}, []
    for key, value in cfg.items():
        action = actions.get(key)
        try:
            typed[key] = value if action is None else _typed(action, value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as e:
            problems.append(f"{key}: {value!r}: {e}")
    if problems:
        raise UsageError(f"{name}: {len(problems)} value(s) that the option(s) do not take:", details=problems)
    return typed


def _typed(action: argparse.Action, value: Any) -> Any:
    if not isinstance(action, (argparse._StoreAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        return value  # options of their own parsing (--opt-kwargs' key=value pairs: a mapping in YAML)
    if value is None or action.nargs == 0:  # unset; flags (store_true) are YAML booleans
        if action.nargs == 0 and not isinstance(value, bool):
            raise TypeError("expected true or false")
        return value
    convert = action.type or (lambda text: text)
    if action.nargs in ("+", "*") and not isinstance(value, (list, dict)):
        value = [value]  # `mean: 0.5`, as `--mean 0.5` gives it
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        if not isinstance(value, list):
            raise TypeError("expected a list" + (f" of {action.nargs}" if isinstance(action.nargs, int) else ""))
        if isinstance(action.nargs, int) and len(value) != action.nargs:
            raise ValueError(f"expected {action.nargs} values, got {len(value)}")
        return [_one(action, convert, v) for v in value]
    if isinstance(value, (list, dict)):
        raise TypeError(f"expected one value, got a {type(value).__name__}")
    return _one(action, convert, value)


def _one(action: argparse.Action, convert: Callable, value: Any) -> Any:
    if isinstance(value, bool) and action.type in (int, float):
        raise TypeError("expected a number")
    if isinstance(value, bool):  # str(value) would be the word "True" or "False"
        raise TypeError("a YAML boolean (unquoted yes, no, on, off, true, false): quote it to mean the word")
    if isinstance(value, float) and action.type is int or not isinstance(value, (str, int, float)):
        raise TypeError(f"expected {getattr(action.type, '__name__', 'a string')}")
    converted = convert(str(value))
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"choose one of {', '.join(map(str, action.choices))}")
    return converted


def _probability(v: float) -> bool:
    return 0.0 <= v <= 1.0


def _non_negative(v: float) -> bool:
    return math.isfinite(v) and v >= 0.0


def _positive(v: float) -> bool:
    return math.isfinite(v) and v > 0.0


RANGES: dict[str, tuple[Callable[[float], bool], str]] = {  # option -> (holds for every value set, what it must be)
    "drop": (_probability, "a probability, 0 to 1"),
    "drop_path": (_probability, "a probability, 0 to 1"),
    "smoothing": (lambda v: 0.0 <= v < 1.0, "at least 0 and below 1"),
    "hflip": (_probability, "a probability, 0 to 1"),
    "vflip": (_probability, "a probability, 0 to 1"),
    "reprob": (_probability, "a probability, 0 to 1"),
    "mixup_prob": (_probability, "a probability, 0 to 1"),
    "mixup_switch_prob": (_probability, "a probability, 0 to 1"),
    "bce_target_thresh": (_probability, "a probability, 0 to 1"),
    "color_jitter": (_non_negative, "0 or more"),
    "mixup": (_non_negative, "0 or more (0: off)"),
    "cutmix": (_non_negative, "0 or more (0: off)"),
    "momentum": (lambda v: 0.0 <= v < 1.0, "at least 0 and below 1 (at 1 and above no gradient is ever forgotten)"),
    "weight_decay": (_non_negative, "0 or more"),
    "clip_grad": (_non_negative, "0 or more (0: no clipping)"),
    "lr": (_non_negative, "0 or more"),
    "lr_base": (_non_negative, "0 or more"),
    "warmup_lr": (_non_negative, "0 or more"),
    "min_lr": (_non_negative, "0 or more"),
    "std": (_positive, "above 0 (pixels are divided by it)"),
    "scale": (lambda v: 0.0 < v <= 1.0, "fractions of the image's area, above 0 and at most 1"),
    "ratio": (_positive, "above 0"),
    "crop_pct": (_non_negative, "0 or more (0: the model's)"),
    "model_ema_decay": (_probability, "0 to 1"),
    # schedules: a negative factor makes the learning rate negative (gradient ascent, without a word); timm divides
    # by the decay interval and takes logarithms of the cycle length; its noise is redrawn until it is below the limit
    "decay_rate": (_non_negative, "0 or more (the factor each decay multiplies the rate by; poly's power)"),
    "decay_epochs": (_positive, "above 0"),
    "lr_cycle_mul": (_positive, "above 0 (each cycle's length, relative to the one before)"),
    "lr_cycle_decay": (_non_negative, "0 or more (the factor each cycle's peak rate is multiplied by)"),
    "lr_k_decay": (_positive, "above 0 (1: the plain schedule)"),
    "lr_noise_pct": (_positive, "above 0 (the noise's limit, a fraction of the rate)"),
    "lr_noise_std": (_non_negative, "0 or more"),
    "layer_decay": (_non_negative, "0 or more (each layer's rate is the next one's times it)"),
    "bce_pos_weight": (_positive, "above 0"),
    "seed": (lambda v: 0 <= v < 2**31, "0 to 2147483647 (numpy seeds each process with seed + rank)"),
}
REMODES = ("const", "rand", "pixel")  # timm's random erasing modes (it asserts on others)
# timm's global pools (SelectAdaptivePool2d asserts on others; none, "", leaves a map of logits per image)
POOLS = ("avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse values outside their options' ranges, and mean/std/scale/ratio lists that cannot be, one line each."""
    problems = []
    for key, (holds, must) in RANGES.items():
        value = getattr(args, key, None)
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(holds(v) for v in values):
            shown = " ".join(map(str, values))
            problems.append(f"--{key.replace('_', '-')} {shown}: must be {must}")
    for key in ("scale", "ratio"):
        value = getattr(args, key)
        if value is not None and (len(value) != 2 or value[0] > value[1]):
            problems.append(f"--{key} {' '.join(map(str, value))}: must be two values, the smaller first (min max)")
    channels = args.input_size[0] if args.input_size else args.in_chans
    for key in ("mean", "std"):
        value = getattr(args, key)
        counts = {1, 3, channels or 3}  # three for one channel: timm's loader averages them
        if value is not None and len(value) not in counts:
            problems.append(f"--{key} {' '.join(map(str, value))}: must be one value, or one per input channel "
                            f"({channels or 3})")
    if args.remode.lower() not in (*REMODES, ""):
        problems.append(f"--remode {args.remode}: must be one of {', '.join(REMODES)}")
    if args.gp is not None and args.gp.lower() not in POOLS:
        problems.append(f"--gp {args.gp!r}: must be one of {', '.join(POOLS)}")
    if args.torchcompile_mode is not None:
        from torch._inductor import list_mode_options

        if args.torchcompile_mode not in (modes := list(list_mode_options())):
            problems.append(f"--torchcompile-mode {args.torchcompile_mode}: must be one of {', '.join(modes)}")
    if problems:
        raise UsageError(f"{len(problems)} option value(s) out of range:", details=problems)
