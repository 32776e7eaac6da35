"""NFNet (Brock et al., 2021) as the authors define it, registered in timm's model factory.

Module and parameter names follow timm's ``NormFreeNet`` so that timm's ``dm_nfnet_*`` state
dicts load unchanged; the numerics follow the authors (weight standardisation form chosen per
model, stochastic depth without rescaling, squeeze-excite width ``int(channels * 0.5)``).

No ``from __future__ import annotations`` here, in layers.py or in folding.py: torch.fx copies forward's
annotations into the traced code, where TorchScript cannot read them as strings (timm's fx-then-script test).
"""
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # not exported by timm; its own models import it so
from torch import nn

from .layers import ScaledActivation, SqueezeExcite, StochasticDepth, WSConv2d
from .variants import VARIANTS, Variant, model_name, pretrained_tags


@dataclass(frozen=True)
class NFNetCfg:
    """Architecture hyper-parameters (the authors' ``NFNet.__init__`` arguments). The per-variant ones come
    from the variant table (``variants.py``); the rest are the same for every variant."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    stem_chs: tuple[int, ...]
    group_size: int
    bottle_ratio: float = 0.5
    se_ratio: float = 0.5
    alpha: float = 0.2
    act: str = "gelu"
    ws: str = "timm"
    ws_eps: float | None = None
    final_conv_mult: int = 2
    stem_strides: tuple[int, ...] = field(default=(2, 1, 1, 2))

    @classmethod
    def from_variant(cls, v: Variant, **overrides: Any) -> "NFNetCfg":
        return replace(cls(depths=v.depths, widths=v.widths, stem_chs=v.stem_channels, group_size=v.group_size),
                       **overrides)


class DownsampleAvg(nn.Module):
    """Shortcut projection: 2x2 average pool when strided, then a 1x1 conv."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, **conv: Any):
        super().__init__()
        self.pool = nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        self.conv = WSConv2d(in_chs, out_chs, 1, **conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))


class NFBlock(nn.Module):
    """Bottleneck block: 1x1 -> grouped 3x3 (strided) -> grouped 3x3 -> 1x1, squeeze-excite, skip gain."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, beta: float, cfg: NFNetCfg, drop_path: float = 0.0,
                 drop_path_scale_by_keep: bool = False, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        mid = int(out_chs * cfg.bottle_ratio)
        groups = max(1, mid // cfg.group_size)
        mid = groups * cfg.group_size if mid >= cfg.group_size else mid
        dd = dict(device=device, dtype=dtype)
        conv = dict(ws=cfg.ws, eps=cfg.ws_eps, **dd)
        self.alpha, self.beta, self.attn_gain = cfg.alpha, beta, 2.0
        self.downsample = (DownsampleAvg(in_chs, out_chs, stride, **conv)
                           if stride > 1 or in_chs != out_chs else None)
        self.act1 = ScaledActivation(cfg.act)
        self.conv1 = WSConv2d(in_chs, mid, 1, **conv)
        self.act2 = ScaledActivation(cfg.act)
        self.conv2 = WSConv2d(mid, mid, 3, stride=stride, groups=groups, **conv)
        self.act2b = ScaledActivation(cfg.act)
        self.conv2b = WSConv2d(mid, mid, 3, groups=groups, **conv)
        self.act3 = ScaledActivation(cfg.act)
        self.conv3 = WSConv2d(mid, out_chs, 1, **conv)
        self.attn_last = SqueezeExcite(out_chs, cfg.se_ratio, **dd)
        self.drop_path = StochasticDepth(drop_path, drop_path_scale_by_keep) if drop_path > 0 else nn.Identity()
        # shape (1,), not timm's (): FSDP2 cannot shard scalars; timm's scalars load through the hook below
        self.skipinit_gain = nn.Parameter(torch.zeros(1, **dd))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "skipinit_gain"
        if key in state_dict and state_dict[key].ndim == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = self.downsample(out) if self.downsample is not None else x
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        out = self.conv2b(self.act2b(out))
        out = self.conv3(self.act3(out))
        out = self.attn_gain * self.attn_last(out)
        out = self.drop_path(out)
        return out * (self.skipinit_gain * self.alpha) + shortcut


def _stem(in_chans: int, cfg: NFNetCfg, **dd: Any) -> nn.Sequential:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (c, s) in enumerate(zip(cfg.stem_chs, cfg.stem_strides)):
        if i:
            layers[f"act{i + 1}"] = ScaledActivation(cfg.act)
        layers[f"conv{i + 1}"] = WSConv2d(in_chans, c, 3, stride=s, ws=cfg.ws, eps=cfg.ws_eps, **dd)
        in_chans = c
    return nn.Sequential(layers)


class NFNet(nn.Module):
    """Normalizer-Free Network (F family). Speaks timm's model interface."""

    def __init__(self, cfg: NFNetCfg, num_classes: int = 1000, in_chans: int = 3, global_pool: str = "avg",
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, drop_path_scale_by_keep: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, **cfg_overrides: Any):
        super().__init__()
        cfg = replace(cfg, **cfg_overrides)
        dd = dict(device=device, dtype=dtype)  # timm's factory arguments: where and in what dtype to build
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        self.stem = _stem(in_chans, cfg, **dd)
        stem_reduction = 1
        for s in cfg.stem_strides:
            stem_reduction *= s
        self.stem_feat_idx = 2 * (len(cfg.stem_chs) - 2)  # the penultimate stem conv, as in timm
        self.feature_info = [dict(num_chs=cfg.stem_chs[-2], reduction=2, module=f"stem.conv{len(cfg.stem_chs) - 1}")]

        num_blocks, index, prev = sum(cfg.depths), 0, cfg.stem_chs[-1]
        reduction, expected_std, stages = stem_reduction, 1.0, []
        for stage_idx, (depth, width) in enumerate(zip(cfg.depths, cfg.widths)):
            stride = 1 if stage_idx == 0 else 2
            reduction *= stride
            blocks = []
            for block_idx in range(depth):
                blocks.append(NFBlock(prev, width, stride if block_idx == 0 else 1, 1.0 / expected_std, cfg,
                                      drop_path_rate * index / num_blocks, drop_path_scale_by_keep, **dd))
                if block_idx == 0:
                    expected_std = 1.0
                expected_std = (expected_std ** 2 + cfg.alpha ** 2) ** 0.5
                prev, index = width, index + 1
            stages.append(nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{stage_idx}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = cfg.final_conv_mult * prev
        self.final_conv = WSConv2d(prev, self.num_features, 1, ws=cfg.ws, eps=cfg.ws_eps, **dd)
        self.final_act = ScaledActivation(cfg.act)
        self.feature_info[-1] = dict(num_chs=self.num_features, reduction=reduction, module="final_conv")
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)
        self._init_weights()

    def _init_weights(self) -> None:
        for _name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)  # the authors' classifier init
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="linear")
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=[(r"^stages\.(\d+)" if coarse else r"^stages\.(\d+)\.(\d+)", None),
                                           (r"^final_conv", (99999,))])

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The gains (the authors decay neither gains nor biases; timm spares the 1-d ones by itself)."""
        return {name for name, _ in self.named_parameters() if name.endswith("gain")}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new classifier for ``num_features`` (which pruning changes), on the model's device, in its dtype
        and training mode, as timm's models reset theirs."""
        like = self.stem.conv1.weight
        self.num_classes = num_classes
        self.head.in_features = self.num_features
        self.head.reset(num_classes, global_pool)
        self.head.to(device=like.device, dtype=like.dtype).train(self.training)
        if isinstance(self.head.fc, nn.Linear):
            nn.init.normal_(self.head.fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.head.fc.bias)

    def forward_intermediates(self, x: torch.Tensor, indices: int | list[int] | None = None, norm: bool = False,
                              stop_early: bool = False, output_fmt: str = "NCHW", intermediates_only: bool = False):
        """timm's intermediate-feature API: index 0 is the stem tap, then each stage; the last after final_conv."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        last = len(self.stages)
        take, max_index = feature_take_indices(last + 1, indices)
        intermediates = []
        for i, module in enumerate(self.stem):
            x = module(x)
            if i == self.stem_feat_idx and 0 in take:
                intermediates.append(x)
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index]
        for idx, stage in enumerate(stages, start=1):
            x = stage(x)
            if idx == last:
                x = self.final_conv(x)
            if idx in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if len(stages) == last:
            x = self.final_act(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        if prune_end:  # the features end at the last kept tap
            self.final_conv, self.final_act = nn.Identity(), nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if max_index == 0:
            self.stem = self.stem[:self.stem_feat_idx + 1]  # the stem tap is before its last conv
        self.stages = self.stages[:max_index]
        if prune_head or prune_end:  # the head is sized for the final features
            self.reset_classifier(0, "")
        return take

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.final_act(self.final_conv(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cfg(v: Variant, **kwargs: Any) -> dict[str, Any]:
    pool = -(-v.train_size // 32)
    return {
        "num_classes": 1000, "input_size": (3, v.train_size, v.train_size), "pool_size": (pool, pool),
        "test_input_size": (3, v.test_size, v.test_size), "crop_pct": v.crop_pct, "crop_mode": "squash",
        "interpolation": "bicubic", "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1", "classifier": "head.fc", "license": "apache-2.0", **kwargs,
    }


def _variant_cfgs(name: str, v: Variant) -> dict[str, dict[str, Any]]:
    sources = {
        "dm_in1k": {"hf_hub_id": f"timm/{v.timm_weights}.dm_in1k"},  # timm's conversion, loaded by timm
        "deepmind_in1k": {},  # the authors' own checkpoint after `nfnet-hub convert deepmind`: a local file
    }
    tags = pretrained_tags(name)
    if not tags:
        return {model_name(name): _cfg(v)}
    return {f"{model_name(name)}.{tag}": _cfg(v, **sources[tag]) for tag in tags}


default_cfgs = generate_default_cfgs({k: c for n, v in VARIANTS.items() for k, c in _variant_cfgs(n, v).items()})


# The authors' numerics: their weight standardisation and jax.nn.gelu's tanh approximation.
DEEPMIND_NUMERICS = {"ws": "deepmind", "act": "gelu_tanh"}


def model_cfg(variant: str) -> NFNetCfg:
    """The architecture of a variant (``"f0"``, ``"f3_plus"``, ``"nano"``...)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown NFNet variant {variant!r}; valid: {', '.join(VARIANTS)}")
    return NFNetCfg.from_variant(VARIANTS[variant])


def recorded_model_args(path: str) -> dict[str, str]:
    """The model args a safetensors file of ours records (``save_safetensors``: the WS form, the activation, a
    global pooling) where they are not the defaults; {} for other files."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError):
        return {}
    defaults = {"ws": NFNetCfg.ws, "act": NFNetCfg.act, "global_pool": "avg"}
    return {k: meta[f"nfnet_hub.{k}"] for k, value in defaults.items() if meta.get(f"nfnet_hub.{k}", value) != value}


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> NFNet:
    v = VARIANTS[variant]
    kwargs.setdefault("drop_rate", v.drop_rate)
    if pretrained and (file := (kwargs.get("pretrained_cfg_overlay") or {}).get("file")):
        kwargs = {**recorded_model_args(file), **kwargs}  # what its weights expect, unless asked otherwise
    tag = kwargs.get("pretrained_cfg")
    if isinstance(tag, str) and tag.startswith("deepmind"):
        for k, val in DEEPMIND_NUMERICS.items():
            kwargs.setdefault(k, val)
    return build_model_with_cfg(NFNet, model_name(variant), pretrained, model_cfg=model_cfg(variant),
                                feature_cfg=dict(flatten_sequential=True), **kwargs)


@register_model
def nfnet_hub_f0(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f0", pretrained, **kwargs)


@register_model
def nfnet_hub_f1(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f1", pretrained, **kwargs)


@register_model
def nfnet_hub_f2(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f2", pretrained, **kwargs)


@register_model
def nfnet_hub_f3(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f3", pretrained, **kwargs)


@register_model
def nfnet_hub_f4(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f4", pretrained, **kwargs)


@register_model
def nfnet_hub_f5(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f5", pretrained, **kwargs)


@register_model
def nfnet_hub_f6(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f6", pretrained, **kwargs)


@register_model
def nfnet_hub_f7(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f7", pretrained, **kwargs)


@register_model
def nfnet_hub_f0_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f0_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_f1_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f1_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_f2_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f2_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_f3_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f3_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_f4_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f4_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_f5_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f5_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_f6_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f6_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_f7_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("f7_plus", pretrained, **kwargs)


@register_model
def nfnet_hub_nano(pretrained: bool = False, **kwargs: Any) -> NFNet:
    return _create("nano", pretrained, **kwargs)
