"""fold(): plain modules, same function, for our variants and timm's whole NF family."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import randomise, rel_error
from torch import nn

from nfnet_hub import fold
from nfnet_hub.cpu import PackedConv2d, prepack
from nfnet_hub.folding import FoldError, Scale
from nfnet_hub.models.layers import SqueezeExcite

TIMM_NF = [n for n in timm.list_models() if n.startswith(("dm_nfnet", "nfnet_f", "nfnet_l", "eca_nfnet", "nf_"))]
OURS = timm.list_models("nfnet_hub_*")
# Folded and compared in full: nano, F0, one F+ and one deep variant, and one model of each timm family
# (stem, block, attention and activation kinds); every other model is checked to be built of the same kinds.
FOLDED = ["nfnet_hub_nano", "nfnet_hub_f0", "nfnet_hub_f1_plus", "nfnet_hub_f6", "dm_nfnet_f0", "nfnet_f0",
          "nfnet_l0", "eca_nfnet_l0", "nf_resnet26", "nf_seresnet26", "nf_ecaresnet26", "nf_regnet_b0"]
PLAIN = (nn.Conv2d, nn.GELU, nn.ReLU, nn.SiLU, nn.Sigmoid, nn.ZeroPad2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
         nn.MaxPool2d, nn.Linear, nn.Dropout, nn.Flatten, nn.Identity, nn.Sequential, SqueezeExcite)


def _check(name: str, size: int = 64, seed: int = 0, **kwargs):
    """Folded agrees with the original to 1e-5 in fp32.

    The deepest nets (timm's nfnet_f6/f7: 84 and 96 blocks) with randomised gains carry fp32
    rounding of about that size in the original itself; there the bar is the original's own
    distance from its float64 evaluation, and exactness is proven in float64 below.
    """
    model = randomise(timm.create_model(name, **kwargs), seed)
    folded = fold(model, img_size=size)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        reference = model(x)
        err = rel_error(folded(x), reference)
        if err > 1e-5:
            truth = copy.deepcopy(model).double()(x.double())
            noise_floor = rel_error(reference, truth)
            assert rel_error(folded(x), truth) <= max(1e-5, 1.5 * noise_floor), (err, noise_floor)
    return folded


def test_timm_family_is_covered():
    assert {"dm_nfnet_f0", "nfnet_l0", "eca_nfnet_l0", "nf_resnet50", "nf_regnet_b0", "nf_ecaresnet26"} <= set(TIMM_NF)


@pytest.mark.parametrize("name", FOLDED)
def test_representative_models_fold_exactly(name):
    _check(name, num_classes=16)


def _kinds(name: str) -> set[tuple]:
    """The module types of a model with the settings fold reads from them (built on the meta device)."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=16)
    kinds = set()
    for m in model.modules():
        settings = tuple(getattr(m, a, None) for a in ("kind", "act_fn", "add_maxpool", "dynamic_pad", "same_pad"))
        kinds.add((type(m), *(getattr(s, "__name__", s) for s in settings)))
    stems = tuple(type(m) for m in model.stem.children())
    return kinds | {("stem", *stems)}


def test_every_other_model_is_built_of_kinds_that_fold_exactly():
    covered = set().union(*(_kinds(name) for name in FOLDED))
    for name in sorted(set(OURS + TIMM_NF) - set(FOLDED)):
        assert _kinds(name) <= covered, (name, _kinds(name) - covered)


@pytest.mark.parametrize("name", ["nfnet_hub_nano", "nfnet_hub_f0", "dm_nfnet_f0", "nfnet_f0", "nfnet_l0",
                                  "eca_nfnet_l0", "nf_resnet26", "nf_seresnet26", "nf_ecaresnet26", "nf_regnet_b0"])
def test_fold_is_exact_in_double_precision(name):
    """In float64 rounding vanishes: what is left would be a folding mistake."""
    model = randomise(timm.create_model(name, num_classes=16)).double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        assert rel_error(fold(model, img_size=64)(x), model(x)) <= 1e-12


@pytest.mark.parametrize("act", ["elu", "celu", "selu", "leaky_relu", "relu6", "sigmoid", "tanh"])
def test_every_activation_timm_has_a_gamma_for_folds_exactly(act):
    """timm builds NF models with any activation of its gamma table: the gamma in the convolution (nf_resnet) or in
    the activation (dm_nfnet's GammaAct); both were refused for all but relu, silu and gelu."""
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for name in ("nf_resnet26", "dm_nfnet_f0"):
        model = randomise(timm.create_model(name, num_classes=16, act_layer=act)).double()
        with torch.no_grad():
            assert rel_error(fold(model, img_size=64)(x), model(x)) <= 1e-12, name


def test_full_size_f0_at_test_resolution_folds_every_constant():
    folded = _check("nfnet_hub_f0", size=256)
    for m in folded.modules():
        if m is folded or isinstance(m, nn.Module) and type(m).__module__.startswith("nfnet_hub.folding"):
            continue
        assert isinstance(m, PLAIN) or type(m).__module__.startswith("timm.layers"), type(m)
    assert not any(isinstance(m, Scale) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters())


def test_authors_numerics_fold_too():
    _check("nfnet_hub_nano", size=32, ws="deepmind", act="gelu_tanh")


def test_zero_skip_gain_removes_the_branch_exactly():
    model = randomise(timm.create_model("nfnet_hub_nano"))
    with torch.no_grad():
        model.stages[2][1].skipinit_gain.zero_()
    folded = fold(model, img_size=32)
    assert folded.stages[2][1].branch is None
    assert folded.stages[2][0].branch is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_error(folded(x), model(x)) <= 1e-5


def test_the_folded_size_is_enforced_where_padding_depends_on_it():
    folded = fold(randomise(timm.create_model("nfnet_hub_nano")), img_size=64)
    with pytest.raises(ValueError, match="folded for 64x64"):
        folded(torch.randn(1, 3, 96, 96))
    assert folded(torch.randn(5, 3, 64, 64)).shape == (5, 1000)


def test_a_folded_model_folds_to_itself():
    """fold(fold(m)) is fold(m) (a user folds, then hands the result to export_onnx, which folds), at the size
    it was folded for where padding depends on the size, at any size otherwise."""
    model = randomise(timm.create_model("nfnet_hub_nano", in_chans=1))
    folded = fold(model, img_size=64)
    again = fold(folded)
    assert again is not folded and again.img_size == (64, 64) and again.in_chans == 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), folded(x), rtol=0, atol=0)
        assert rel_error(again(x), model.eval()(x)) <= 1e-5
    with pytest.raises(FoldError, match=r"folded for 64x64 inputs .* not 96x96: fold the original model"):
        fold(folded, img_size=96)
    resnet = fold(randomise(timm.create_model("nf_resnet26")), img_size=32)  # symmetric padding: any size
    assert not resnet.size_dependent and fold(resnet, img_size=48).img_size == (48, 48)


def test_unknown_modules_are_named():
    model = randomise(timm.create_model("nfnet_hub_nano"))  # a zero skip gain would drop the branch unread
    model.stages[1][0].act2 = nn.Softmax2d()  # not elementwise: nothing says a gain may pass it
    with pytest.raises(FoldError, match=r"stages\.1\.0\.act2: cannot fold activation of type Softmax2d"):
        fold(model, img_size=32)
    with pytest.raises(FoldError, match="not an NFNet"):
        fold(timm.create_model("resnet18"))
    # wrapped and scripted NFNets are told what to fold (they were "not an NFNet", "cannot fold activation")
    with pytest.raises(FoldError, match=r"cannot fold DataParallel: fold the model it wraps, fold\(model.module\)"):
        fold(nn.DataParallel(model))
    with pytest.raises(FoldError, match=r"fold the eager model, then script the result, torch.jit.script\(fold"):
        fold(torch.jit.script(timm.create_model("nfnet_hub_nano")))


def test_fold_leaves_the_model_untouched_and_in_its_mode():
    model = randomise(timm.create_model("nfnet_hub_nano")).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold(model, img_size=32)
    assert model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


@pytest.mark.parametrize("name, kwargs", [("nfnet_hub_nano", {}), ("nfnet_hub_nano", {"act": "gelu_tanh"}),
                                          ("dm_nfnet_f0", {}), ("nf_resnet26", {}), ("nf_regnet_b0", {}),
                                          ("eca_nfnet_l0", {})])
def test_prepacked_model_computes_the_same_function(name, kwargs):
    """GELU (erf and tanh), ReLU and SiLU fused into oneDNN convolutions; any batch, either memory format."""
    model = randomise(timm.create_model(name, num_classes=16, **kwargs))
    folded = fold(model, img_size=64)
    packed = prepack(folded)
    assert not any(type(m) is nn.Conv2d for m in packed.modules())
    pairs = [(a, b) for seq in packed.modules() if isinstance(seq, nn.Sequential) for a, b in zip(seq, seq[1:])]
    assert not [b for a, b in pairs if isinstance(a, PackedConv2d) and isinstance(b, (nn.GELU, nn.ReLU, nn.SiLU))]
    assert any(m.act != "none" for m in packed.modules() if isinstance(m, PackedConv2d))
    with torch.no_grad():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 64, 64)
            assert rel_error(packed(x), model(x)) <= 1e-5
            assert rel_error(packed(x.contiguous(memory_format=torch.channels_last)), folded(x)) <= 1e-5
    assert any(type(m) is nn.Conv2d for m in folded.modules())  # the folded model is left plain


def test_prepack_refuses_what_it_cannot_pack():
    model = randomise(timm.create_model("nfnet_hub_nano"))
    with pytest.raises(ValueError, match="result of fold"):
        prepack(model)
    with pytest.raises(ValueError, match="float32 models on the CPU, this one is torch.float64"):
        prepack(fold(model, img_size=32).double())
