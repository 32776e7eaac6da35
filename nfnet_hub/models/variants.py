"""The NFNet variant table, in one place, as in the authors' ``nfnet_params``.

Every F variant shares the widths [256, 512, 1536, 1536]; each has an "F+" twin that is
slightly wider ([384, 768, 2048, 2048]) with everything else unchanged. ``nano`` keeps the
block structure at a few hundred thousand parameters for tests, the quickstart and small devices.
"""
from __future__ import annotations

from dataclasses import dataclass

F_WIDTHS = (256, 512, 1536, 1536)
F_PLUS_WIDTHS = (384, 768, 2048, 2048)


@dataclass(frozen=True)
class Variant:
    """Architecture and recipe facts of one variant."""

    depths: tuple[int, ...]
    widths: tuple[int, ...]
    train_size: int
    test_size: int
    randaug: tuple[int, int]  # RandAugment (layers, magnitude)
    drop_rate: float
    crop_pct: float = 0.9
    stem_chs: tuple[int, ...] | None = None  # None: (16, 32, 64, widths[0] // 2)
    group_size: int = 128
    timm_weights: str | None = None  # timm's converted DeepMind weights, if published

    @property
    def stem_channels(self) -> tuple[int, ...]:
        return self.stem_chs or (16, 32, 64, self.widths[0] // 2)


def _f(depths, train, test, randaug, drop, crop=0.9, weights=None):
    return Variant(tuple(depths), F_WIDTHS, train, test, randaug, drop, crop, timm_weights=weights)


_F = {
    "f0": _f([1, 2, 6, 3], 192, 256, (4, 5), 0.2, 0.9, "dm_nfnet_f0"),
    "f1": _f([2, 4, 12, 6], 224, 320, (4, 10), 0.3, 0.91, "dm_nfnet_f1"),
    "f2": _f([3, 6, 18, 9], 256, 352, (4, 10), 0.4, 0.92, "dm_nfnet_f2"),
    "f3": _f([4, 8, 24, 12], 320, 416, (4, 15), 0.4, 0.94, "dm_nfnet_f3"),
    "f4": _f([5, 10, 30, 15], 384, 512, (4, 15), 0.5, 0.951, "dm_nfnet_f4"),
    "f5": _f([6, 12, 36, 18], 416, 544, (4, 15), 0.5, 0.954, "dm_nfnet_f5"),
    "f6": _f([7, 14, 42, 21], 448, 576, (4, 15), 0.5, 0.956, "dm_nfnet_f6"),
    "f7": _f([8, 16, 48, 24], 480, 608, (4, 15), 0.5),
}

VARIANTS: dict[str, Variant] = {
    **_F,
    **{
        f"{name}_plus": Variant(v.depths, F_PLUS_WIDTHS, v.train_size, v.test_size, v.randaug, v.drop_rate,
                                v.crop_pct)
        for name, v in _F.items()
    },
    "nano": Variant((1, 1, 2, 1), (32, 64, 128, 128), 32, 32, (2, 5), 0.1, 1.0,
                    stem_chs=(8, 16, 16, 16), group_size=16),
}


def model_name(variant: str) -> str:
    return f"nfnet_hub_{variant}"
