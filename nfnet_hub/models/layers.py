"""Building blocks of an NFNet: weight-standardised convolutions, gamma-scaled activations,
squeeze-excite and stochastic depth."""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

# Variance-preserving gains of the authors' ``base.nonlinearities``. The authors call
# ``jax.nn.gelu``, whose default is the tanh approximation ("gelu_tanh"); timm uses the exact erf form.
ACT_GAMMA = {"gelu": 1.7015043497085571, "gelu_tanh": 1.7015043497085571, "relu": 1.7139588594436646,
             "silu": 1.7881293296813965}
ACT_FN = {"gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu, "silu": F.silu}

# The two published forms of scaled weight standardisation.
WS_FORMS = ("timm", "deepmind")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial dimension of ``size``."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    return total // 2, total - total // 2


class WSConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardisation, a learnable per-output gain and SAME padding.

    ``ws="timm"``: ``(w - mean) / sqrt(var + eps) * gain / sqrt(fan_in)`` (timm's ScaledStdConv2d).
    ``ws="deepmind"``: ``(w - mean) * rsqrt(max(var * fan_in, eps)) * gain`` (the authors' WSConv2D).
    Stride-1 convolutions pad statically; strided ones compute TF SAME padding from the input,
    as both the authors (Haiku ``padding="SAME"``) and timm's ``dm_nfnet`` do.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 *, ws: str = "timm", eps: float | None = None, gain_init: float = 1.0):
        if ws not in WS_FORMS:
            raise ValueError(f"unknown weight standardisation {ws!r}: choose one of {WS_FORMS}")
        self.dynamic_pad = stride > 1 and kernel_size > 1
        padding = 0 if self.dynamic_pad else (kernel_size - 1) // 2
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=padding, groups=groups, bias=True)
        self.ws = ws
        self.eps = eps if eps is not None else (1e-5 if ws == "timm" else 1e-4)
        self.gain = nn.Parameter(torch.full((out_chs, 1, 1, 1), gain_init))

    def standardized_weight(self) -> torch.Tensor:
        w = self.weight
        fan_in = w[0].numel()
        if self.ws == "timm":
            scale = (self.gain * fan_in ** -0.5).view(-1)
            return F.batch_norm(w.reshape(1, self.out_channels, -1), None, None, weight=scale,
                                training=True, momentum=0.0, eps=self.eps).reshape_as(w)
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps)) * self.gain
        return w * scale - mean * scale

    def pad_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_pad:
            return x
        k, s = self.kernel_size[0], self.stride[0]
        top, bottom = same_padding(x.shape[-2], k, s)
        left, right = same_padding(x.shape[-1], k, s)
        return F.pad(x, (left, right, top, bottom))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.pad_input(x), self.standardized_weight(), self.bias, self.stride, self.padding,
                        self.dilation, self.groups)


class ScaledActivation(nn.Module):
    """``act(x) * gamma``: the authors' variance-preserving nonlinearity."""

    def __init__(self, kind: str = "gelu", gamma: float | None = None):
        super().__init__()
        if kind not in ACT_FN:
            raise ValueError(f"unknown activation {kind!r}: choose one of {sorted(ACT_FN)}")
        self.kind = kind
        self.gamma = ACT_GAMMA[kind] if gamma is None else gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ACT_FN[self.kind](x) * self.gamma

    def extra_repr(self) -> str:
        return f"{self.kind}, gamma={self.gamma}"


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(mean(x)))))``; the block applies the gain of 2."""

    def __init__(self, channels: int, ratio: float = 0.5, hidden: int | None = None):
        super().__init__()
        hidden = hidden or max(1, int(channels * ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(gate)


class StochasticDepth(nn.Module):
    """Drops the residual branch of whole samples while training.

    The authors do not rescale the kept samples (``scale_by_keep=False``); timm's DropPath does.
    """

    def __init__(self, rate: float, scale_by_keep: bool = False):
        super().__init__()
        self.rate = rate
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * (mask / keep if self.scale_by_keep else mask)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, scale_by_keep={self.scale_by_keep}"
