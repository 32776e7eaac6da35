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


@dataclass(frozen=True)
class Counts:
    """Parameters (with 1000 classes) and multiply-adds in billions at the train and test sizes, so
    that ``nfnet-hub list`` answers without building 830M parameters (a test checks them against
    built models)."""

    params: int
    gmacs_train: float
    gmacs_test: float


COUNTS: dict[str, Counts] = {
    "f0": Counts(71_489_284, 6.977, 12.3842), "f1": Counts(132_634_256, 17.4379, 35.539),
    "f2": Counts(193_779_228, 33.1393, 62.593), "f3": Counts(254_924_200, 67.9443, 114.7635),
    "f4": Counts(316_069_172, 121.1223, 215.2412), "f5": Counts(377_214_144, 169.4984, 289.7571),
    "f6": Counts(438_359_116, 228.2929, 377.2803), "f7": Counts(499_504_088, 298.4765, 478.7816),
    "f0_plus": Counts(118_824_516, 10.999, 19.5202), "f1_plus": Counts(220_357_008, 27.21, 55.445),
    "f2_plus": Counts(321_889_500, 51.5086, 97.2754), "f3_plus": Counts(423_421_992, 105.383, 177.9865),
    "f4_plus": Counts(524_954_484, 187.619, 333.3897), "f5_plus": Counts(626_486_976, 262.3277, 448.4265),
    "f6_plus": Counts(728_019_468, 353.1016, 583.5173), "f7_plus": Counts(829_551_960, 461.4365, 740.1578),
    "nano": Counts(499_621, 0.002505728, 0.002505728),
}


def model_name(variant: str) -> str:
    return f"nfnet_hub_{variant}"


def pretrained_tags(variant: str) -> list[str]:
    """``dm_in1k`` (timm's conversion of the authors' weights) and ``deepmind_in1k`` (the authors' own
    checkpoint after ``nfnet-hub convert``), where published."""
    return ["dm_in1k", "deepmind_in1k"] if VARIANTS[variant].timm_weights else []


def table(markdown: bool = False) -> str:
    """The variant table that ``nfnet-hub list`` prints and the README shows."""
    head = ("model", "params", "GMACs train / test", "train / test px", "dropout", "pretrained")
    gmacs = lambda x: f"{x:.2f}" if x >= 1 else f"{x:.2g}"  # noqa: E731
    rows = [(model_name(name), f"{COUNTS[name].params / 1e6:.1f}M",
             f"{gmacs(COUNTS[name].gmacs_train)} / {gmacs(COUNTS[name].gmacs_test)}", f"{v.train_size} / {v.test_size}",
             f"{v.drop_rate:g}", ", ".join(pretrained_tags(name)) or "-") for name, v in VARIANTS.items()]
    if markdown:
        return "\n".join("| " + " | ".join(r) + " |" for r in (head, ("---",) * len(head), *rows))
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (head, *rows))
