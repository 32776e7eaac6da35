"""argparse types shared by the command line's commands: each refuses a bad value in one line."""
from __future__ import annotations

import argparse
import math


def _number(text: str, cast: type, expected: str, ok) -> int | float:
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
    return value


def positive(text: str) -> int:
    return _number(text, int, "a positive integer", lambda v: v >= 1)


def port(text: str) -> int:
    return _number(text, int, "a TCP port, 1 to 65535", lambda v: 1 <= v <= 65535)


def at_least(low: int):
    """A parser of integers from ``low`` up (argparse names it in its errors)."""
    def parse(text: str) -> int:
        return _number(text, int, f"an integer of at least {low}", lambda v: v >= low)

    parse.__name__ = f"integer >= {low}"
    return parse


def non_negative_float(text: str) -> float:
    return _number(text, float, "a finite number of at least 0", lambda v: math.isfinite(v) and v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a finite number above 0", lambda v: math.isfinite(v) and v > 0)


def fraction(text: str) -> float:
    return _number(text, float, "a number between 0 and 1", lambda v: 0.0 <= v <= 1.0)


def split_name(text: str) -> str:
    """A dataset split's name: an empty one reads the whole data folder (timm's train.py takes an empty --val-split
    as no evaluation, which nfnet-hub train does not implement: it would validate on the training images)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("name the split: an empty name would read the whole data folder as it "
                                         "(timm's train.py takes an empty --val-split as no evaluation, which "
                                         "nfnet-hub train does not implement: it evaluates every run)")
    return text


def opset(text: str) -> int:
    """An ONNX opset that export writes (``export_limits.check_opset`` says which), refused before any work starts."""
    from .errors import UsageError
    from .export_limits import check_opset

    value = _number(text, int, "an integer", lambda v: True)
    try:
        check_opset(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value
