"""Fold an NFNet into plain inference modules that compute the same function.

Scaled weight standardisation is a pure function of the parameters, so at inference each
standardised kernel is a constant: it becomes the weight of a plain ``nn.Conv2d``. Every constant
scalar (activation gammas, beta, alpha times the skip gain, the squeeze-excite gain of 2) is
multiplied into the neighbouring kernel; where it scales a tensor that a squeeze-excite also reads,
the excite's first layer is divided by the same scalar, which keeps the gate exact. TF-style
dynamic SAME padding becomes static padding for the image size folded for.

Works on ``nfnet_hub`` models and on timm's ``NormFreeNet`` family (``dm_nfnet_*``, ``nfnet_*``,
``eca_nfnet_*``, ``nf_resnet*``, ``nf_regnet*``...): both share the module layout
stem / stages / final_conv / final_act / head.
"""
import copy
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import EcaModule, ScaledStdConv2d, ScaledStdConv2dSame, SEModule, register_notrace_function
from timm.models.nfnet import DownsampleAvg as TimmDownsampleAvg
from timm.models.nfnet import GammaAct
from torch import nn

from .errors import FoldError
from .models.layers import ScaledActivation, SqueezeExcite, WSConv2d, same_padding
from .models.nfnet import DownsampleAvg
from .preprocess import eval_size

__all__ = ["FoldError", "FoldedBlock", "FoldedNFNet", "fold"]

_PLAIN_ACTS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "relu": nn.ReLU, "silu": nn.SiLU,
               "swish": nn.SiLU, "elu": nn.ELU, "celu": nn.CELU, "selu": nn.SELU, "leaky_relu": nn.LeakyReLU,
               "relu6": nn.ReLU6, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}  # timm's activations with an NF gamma
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.ELU, nn.CELU, nn.SELU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh,
                nn.Softplus, nn.Softsign, nn.Hardswish, nn.Hardsigmoid, nn.Mish)  # kept as they are
_PASS_THROUGH = (nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.Dropout)  # commute with a positive scalar


class Scale(nn.Module):
    """Multiply by a constant: kept only where no neighbouring kernel can absorb it."""

    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.value

    def extra_repr(self) -> str:  # the value in the repr: Fp32Graph tells folded models apart by it and their tensors
        return repr(self.value)


class FoldedBlock(nn.Module):
    """``branch(act(x)) + shortcut``, with every constant already inside the kernels."""

    def __init__(self, act: nn.Module, downsample: nn.Module | None, branch: nn.Module | None):
        super().__init__()
        self.act, self.downsample, self.branch = act, downsample, branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act(x)
        shortcut = self.downsample(out) if self.downsample is not None else x
        return shortcut if self.branch is None else self.branch(out) + shortcut


@register_notrace_function  # reads the input's size: one opaque call for timm's fx tracer...
def check_folded_size(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``x``, if it has the size the model was folded for (its SAME padding is static)."""
    if x.shape[-2] != height or x.shape[-1] != width:
        raise ValueError(f"this model was folded for {height}x{width} inputs (its SAME padding is static), got "
                         f"{x.shape[-2]}x{x.shape[-1]}: fold it again with img_size=...")
    return x


torch.fx.wrap("check_folded_size")  # ...and for torch.fx's own


class FoldedNFNet(nn.Module):
    """An NFNet made of plain modules, exact for inputs of ``img_size``."""

    def __init__(self, stem: nn.Module, stages: nn.Module, final: nn.Module, head: nn.Module,
                 img_size: tuple[int, int], size_dependent: bool, pretrained_cfg: dict[str, Any], num_classes: int):
        super().__init__()
        self.stem, self.stages, self.final, self.head = stem, stages, final, head
        self.img_size, self.size_dependent = img_size, size_dependent
        self.pretrained_cfg, self.num_classes = pretrained_cfg, num_classes
        self.in_chans = next(m.in_channels for m in stem.modules() if isinstance(m, nn.Conv2d))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.size_dependent:
            x = check_folded_size(x, self.img_size[0], self.img_size[1])
        return self.final(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def _standardized_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The kernel a conv actually applies, computed in float64."""
    if isinstance(conv, WSConv2d):
        double = copy.deepcopy(conv).double()
        return double.standardized_weight().detach()
    w = conv.weight.detach().double()
    if isinstance(conv, (ScaledStdConv2d, ScaledStdConv2dSame)):
        scale = (conv.gain.detach().double() * conv.scale).view(-1)
        return F.batch_norm(w.reshape(1, conv.out_channels, -1), None, None, weight=scale, training=True,
                            momentum=0.0, eps=conv.eps).reshape_as(w)
    if type(conv) is nn.Conv2d:
        return w
    raise FoldError(f"cannot fold convolution of type {type(conv).__name__}")


def _fold_conv(conv: nn.Module, name: str, sizes: dict[nn.Module, tuple[int, int]], in_scale: float = 1.0,
               out_scale: float = 1.0) -> tuple[nn.Module, bool]:
    """A plain conv equal to ``out_scale * conv(in_scale * x)``; True when its padding is size dependent."""
    if not isinstance(conv, nn.Conv2d):
        raise FoldError(f"{name}: expected a convolution, found {type(conv).__name__}")
    try:
        weight = _standardized_weight(conv)
    except FoldError as e:
        raise FoldError(f"{name}: {e}") from None
    bias = conv.bias.detach().double() if conv.bias is not None else weight.new_zeros(conv.out_channels)
    dynamic = getattr(conv, "dynamic_pad", False) or getattr(conv, "same_pad", False)
    pads = (conv.padding[1], conv.padding[1], conv.padding[0], conv.padding[0])
    if dynamic:
        h, w = sizes[conv]
        k, s, d = conv.kernel_size, conv.stride, conv.dilation
        (top, bottom), (left, right) = same_padding(h, k[0], s[0], d[0]), same_padding(w, k[1], s[1], d[1])
        pads = (left, right, top, bottom)
    symmetric = pads[0] == pads[1] and pads[2] == pads[3]
    plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                      (pads[2], pads[0]) if symmetric else 0, conv.dilation, conv.groups, bias=True,
                      dtype=conv.weight.dtype, device=conv.weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight * (in_scale * out_scale))
        plain.bias.copy_(bias * out_scale)
    return (plain, dynamic) if symmetric else (nn.Sequential(nn.ZeroPad2d(pads), plain), True)


def _split_act(act: nn.Module | None, name: str) -> tuple[nn.Module, float]:
    """A plain activation and the constant gamma it multiplied by."""
    if act is None or isinstance(act, nn.Identity):
        return nn.Identity(), 1.0
    if isinstance(act, ScaledActivation):
        return _PLAIN_ACTS[act.kind](), act.gamma
    if isinstance(act, GammaAct):
        kind = getattr(act.act_fn, "__name__", "")
        if kind not in _PLAIN_ACTS:
            raise FoldError(f"{name}: activation function {kind!r} has no plain module")
        return _PLAIN_ACTS[kind](), act.gamma
    if isinstance(act, _ELEMENTWISE) or type(act).__module__.startswith("timm.layers.activations"):
        return copy.deepcopy(act), 1.0
    raise FoldError(f"{name}: cannot fold activation of type {type(act).__name__}")


def _absorb_input_scale(attn: nn.Module, c: float, name: str) -> nn.Module | None:
    """A copy of ``attn`` whose gate is unchanged when its input is multiplied by ``c``, or None."""
    attn = copy.deepcopy(attn)
    if isinstance(attn, SqueezeExcite) or (isinstance(attn, SEModule) and not attn.add_maxpool
                                           and isinstance(attn.bn, nn.Identity)):
        first = attn.fc1
    elif isinstance(attn, EcaModule):
        first = attn.conv
    else:
        return None
    with torch.no_grad():
        first.weight.div_(c)
    return attn


# Folding c into a conv whose attention divides it out again scales the conv's output by c and the attention's
# first weights by 1/c: below this, a small skip gain (early in training, or a block that learned to stay off) takes
# them out of float16's range (the fp16 export was NaN), so c is applied after the attention instead.
_MIN_ABSORBED = 1e-3


def _scaled_producer(conv: nn.Module, attn: nn.Module | None, c: float, name: str, sizes, in_scale: float):
    """Modules equal to ``c * attn(conv(in_scale * x))``, with ``c`` folded into the conv where exact."""
    if attn is None:
        folded, dyn = _fold_conv(conv, name, sizes, in_scale, c)
        return [folded], dyn
    absorbed = _absorb_input_scale(attn, c, name) if abs(c) >= _MIN_ABSORBED else None
    if absorbed is None:
        folded, dyn = _fold_conv(conv, name, sizes, in_scale)
        return [folded, copy.deepcopy(attn), Scale(c)], dyn
    folded, dyn = _fold_conv(conv, name, sizes, in_scale, c)
    return [folded, absorbed], dyn


def _fold_block(block: nn.Module, name: str, sizes) -> tuple[FoldedBlock, bool]:
    dynamic = False
    act, gamma = _split_act(block.act1, f"{name}.act1")
    s_in = gamma * block.beta
    downsample = None
    if block.downsample is not None:
        if not isinstance(block.downsample, (DownsampleAvg, TimmDownsampleAvg)):
            raise FoldError(f"{name}.downsample: cannot fold {type(block.downsample).__name__}")
        conv, dynamic = _fold_conv(block.downsample.conv, f"{name}.downsample.conv", sizes, s_in)
        downsample = nn.Sequential(copy.deepcopy(block.downsample.pool), conv)
    skip = block.skipinit_gain.item() if getattr(block, "skipinit_gain", None) is not None else 1.0
    attn_last = getattr(block, "attn_last", None)
    c = (block.attn_gain if attn_last is not None else 1.0) * skip * block.alpha
    if c == 0.0:  # a zero skip gain switches the residual branch off exactly
        return FoldedBlock(act, downsample, None), dynamic

    layers: list[nn.Module] = []
    conv1, d = _fold_conv(block.conv1, f"{name}.conv1", sizes, s_in)
    layers.append(conv1)
    dynamic |= d
    convs = [("conv2", "act2"), ("conv2b", "act2b")]
    present = [(cv, a) for cv, a in convs if getattr(block, cv, None) is not None]
    attn_mid = getattr(block, "attn", None)
    for i, (cv, a) in enumerate(present):
        plain, g = _split_act(getattr(block, a), f"{name}.{a}")
        layers.append(plain)
        if i == len(present) - 1 and attn_mid is not None:  # RegNet-style: attn between conv2 and conv3
            mods, d = _scaled_producer(getattr(block, cv), attn_mid, block.attn_gain, f"{name}.{cv}", sizes, g)
        else:
            folded, d = _fold_conv(getattr(block, cv), f"{name}.{cv}", sizes, g)
            mods = [folded]
        layers += mods
        dynamic |= d
    plain, g = _split_act(block.act3, f"{name}.act3")
    layers.append(plain)
    mods, d = _scaled_producer(block.conv3, attn_last, c, f"{name}.conv3", sizes, g)
    layers += mods
    return FoldedBlock(act, downsample, nn.Sequential(*layers)), dynamic | d


def _fold_stem(stem: nn.Sequential, sizes) -> tuple[nn.Sequential, bool]:
    layers, pending, dynamic = [], 1.0, False
    for child_name, m in stem.named_children():
        name = f"stem.{child_name}"
        if isinstance(m, nn.Conv2d):
            folded, d = _fold_conv(m, name, sizes, pending)
            layers.append(folded)
            pending, dynamic = 1.0, dynamic | d
        elif isinstance(m, _PASS_THROUGH):
            layers.append(copy.deepcopy(m))
        else:
            plain, g = _split_act(m, name)
            layers.append(plain)
            pending *= g
    if pending != 1.0:
        layers.append(Scale(pending))
    return nn.Sequential(*layers), dynamic


def _fold_head(head: nn.Module, gamma: float) -> nn.Module:
    head = copy.deepcopy(head)
    if isinstance(head.fc, nn.Linear):
        with torch.no_grad():
            head.fc.weight.mul_(gamma)
    elif gamma != 1.0:
        head.fc = nn.Sequential(head.fc, Scale(gamma))
    return head


def _input_sizes(model: nn.Module, img_size: tuple[int, int]) -> dict[nn.Module, tuple[int, int]]:
    """Spatial size of the input of every convolution, for an image of ``img_size``."""
    sizes: dict[nn.Module, tuple[int, int]] = {}

    def record(module: nn.Module, args: tuple) -> None:
        sizes.setdefault(module, tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, nn.Conv2d)]
    p = next(model.parameters())
    try:
        with torch.no_grad():
            model.forward_features(torch.zeros(1, model.in_chans, *img_size, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    return sizes


@torch.no_grad()
def fold(model: nn.Module, *, img_size: int | tuple[int, int] | None = None) -> FoldedNFNet:
    """Return an inference-only copy of ``model`` made of plain modules that computes the same function.

    ``img_size`` (default: the model's test size) fixes the static SAME padding of strided
    convolutions; the folded model refuses other sizes where that padding depends on the size.
    """
    if isinstance(img_size, int):
        img_size = (img_size, img_size)
    if isinstance(model, FoldedNFNet):
        return _refold(model, img_size)
    if isinstance(model, torch.jit.ScriptModule):
        raise FoldError("cannot fold a TorchScript module (it keeps no Python modules to fold): fold the eager model, "
                        "then script the result, torch.jit.script(fold(model))")
    missing = [a for a in ("stem", "stages", "final_conv", "final_act", "head") if not hasattr(model, a)]
    if missing and isinstance(getattr(model, "module", None), nn.Module):  # DDP, DataParallel
        raise FoldError(f"cannot fold {type(model).__name__}: fold the model it wraps, fold(model.module)")
    if missing:
        raise FoldError(f"cannot fold {type(model).__name__}: not an NFNet (missing {', '.join(missing)})")
    img_size = tuple(img_size or eval_size(getattr(model, "pretrained_cfg", None) or {}))
    was_training = model.training
    model.eval()
    try:
        sizes = _input_sizes(model, img_size)
        stem, dynamic = _fold_stem(model.stem, sizes)
        stages = []
        for si, stage in enumerate(model.stages):
            blocks = []
            for bi, block in enumerate(stage):
                name = f"stages.{si}.{bi}"
                if not all(hasattr(block, a) for a in ("act1", "conv1", "conv3", "act3", "alpha", "beta")):
                    raise FoldError(f"{name}: cannot fold block of type {type(block).__name__}")
                folded, d = _fold_block(block, name, sizes)
                blocks.append(folded)
                dynamic |= d
            stages.append(nn.Sequential(*blocks))
        final = []
        if not isinstance(model.final_conv, nn.Identity):
            conv, d = _fold_conv(model.final_conv, "final_conv", sizes)
            final.append(conv)
            dynamic |= d
        act, gamma = _split_act(model.final_act, "final_act")
        final.append(act)
        head = _fold_head(model.head, gamma)
    finally:
        model.train(was_training)
    folded = FoldedNFNet(stem, nn.Sequential(*stages), nn.Sequential(*final), head, img_size, dynamic,
                         dict(getattr(model, "pretrained_cfg", {}) or {}), getattr(model, "num_classes", 0))
    return folded.eval().requires_grad_(False)


def _refold(folded: FoldedNFNet, img_size: tuple[int, int] | None) -> FoldedNFNet:
    """A folded model folds to itself, at any size its padding allows (fold(fold(m)) is fold(m))."""
    size = tuple(img_size or folded.img_size)
    if folded.size_dependent and size != folded.img_size:
        raise FoldError(f"this model was folded for {folded.img_size[0]}x{folded.img_size[1]} inputs (its SAME "
                        f"padding is static), not {size[0]}x{size[1]}: fold the original model with img_size=...")
    again = copy.deepcopy(folded)
    again.img_size = size
    return again
