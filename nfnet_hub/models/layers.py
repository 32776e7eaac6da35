"""Building blocks of an NFNet: weight-standardised convolutions, gamma-scaled activations,
squeeze-excite and stochastic depth.

All of them script (``torch.jit.script``), trace (torch.fx, through timm's tracer) and export
(``torch.export``) as timm's own layers do: strided convolutions pad with timm's ``pad_same`` and
are leaves for fx (``register_notrace_module``, as timm's ``ScaledStdConv2dSame``), and stochastic
depth is timm's ``drop_path``.
"""
import torch
import torch.nn.functional as F
from timm.layers import drop_path, get_same_padding, pad_same, register_notrace_module
from torch import nn

# Variance-preserving gains of the authors' ``base.nonlinearities``. The authors call
# ``jax.nn.gelu``, whose default is the tanh approximation ("gelu_tanh"); timm uses the exact erf form.
ACT_GAMMA = {"gelu": 1.7015043497085571, "gelu_tanh": 1.7015043497085571, "relu": 1.7139588594436646,
             "silu": 1.7881293296813965}

# The two published forms of scaled weight standardisation.
WS_FORMS = ("timm", "deepmind")


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TF "SAME" padding (before, after) of one spatial dimension of ``size``, as timm's ``pad_same`` pads."""
    total = get_same_padding(size, kernel, stride, dilation)
    return total // 2, total - total // 2


@register_notrace_module  # its padding reads the input size: a leaf for fx, as timm's ScaledStdConv2dSame
class WSConv2d(nn.Conv2d):
    """Conv2d with scaled weight standardisation, a learnable per-output gain and SAME padding.

    ``ws="timm"``: ``(w - mean) / sqrt(var + eps) * gain / sqrt(fan_in)`` (timm's ScaledStdConv2d).
    ``ws="deepmind"``: ``(w - mean) * rsqrt(max(var * fan_in, eps)) * gain`` (the authors' WSConv2D).
    Stride-1 convolutions pad statically; strided ones compute TF SAME padding from the input,
    as both the authors (Haiku ``padding="SAME"``) and timm's ``dm_nfnet`` do.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 *, ws: str = "timm", eps: float | None = None, gain_init: float = 1.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        if ws not in WS_FORMS:
            raise ValueError(f"unknown weight standardisation {ws!r}: choose one of {WS_FORMS}")
        self.dynamic_pad = stride > 1 and kernel_size > 1
        padding = 0 if self.dynamic_pad else (kernel_size - 1) // 2
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=padding, groups=groups, bias=True,
                         device=device, dtype=dtype)
        self.ws = ws
        self.eps = eps if eps is not None else (1e-5 if ws == "timm" else 1e-4)
        self.gain = nn.Parameter(torch.full((out_chs, 1, 1, 1), gain_init, device=device, dtype=dtype))

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = pad_same(x, self.kernel_size, self.stride, self.dilation)
        return F.conv2d(x, self.standardized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


class ScaledActivation(nn.Module):
    """``act(x) * gamma``: the authors' variance-preserving nonlinearity."""

    def __init__(self, kind: str = "gelu", gamma: float | None = None):
        super().__init__()
        if kind not in ACT_GAMMA:
            raise ValueError(f"unknown activation {kind!r}: choose one of {sorted(ACT_GAMMA)}")
        self.kind = kind
        self.gamma = ACT_GAMMA[kind] if gamma is None else gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "relu":
            x = F.relu(x)
        elif self.kind == "silu":
            x = F.silu(x)
        else:
            x = F.gelu(x, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"{self.kind}, gamma={self.gamma}"


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(mean(x)))))``; the block applies the gain of 2."""

    def __init__(self, channels: int, ratio: float = 0.5, hidden: int | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        hidden = hidden or max(1, int(channels * ratio))
        self.fc1 = nn.Conv2d(channels, hidden, 1, device=device, dtype=dtype)
        self.fc2 = nn.Conv2d(hidden, channels, 1, device=device, dtype=dtype)

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
        return drop_path(x, self.rate, self.training, self.scale_by_keep)

    def extra_repr(self) -> str:
        return f"rate={self.rate}, scale_by_keep={self.scale_by_keep}"
