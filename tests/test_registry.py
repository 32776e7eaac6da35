"""The NFNet family in timm's factory: architecture, parity with timm, timm's interfaces, weights."""
from __future__ import annotations

import pickle

import pytest
import timm
import torch
from conftest import randomise, rel_error

from nfnet_hub.models import VARIANTS, model_cfg
from nfnet_hub.models.checkpoint import (
    CheckpointError,
    check_fit,
    create_model,
    load_checkpoint,
    read_state_dict,
    save_safetensors,
)
from nfnet_hub.models.stats import model_stats

# The authors' table: parameters (millions) and multiply-adds (billions) at the test size.
AUTHORS = {"f0": (71.5, 12.38), "f1": (132.6, 35.54), "f2": (193.8, 62.59), "f3": (254.9, 114.76),
           "f4": (316.1, 215.24), "f5": (377.2, 289.76), "f6": (438.4, 377.28)}


def test_every_variant_is_registered():
    names = set(timm.list_models("nfnet_hub_*"))
    expected = {f"nfnet_hub_f{i}" for i in range(8)} | {f"nfnet_hub_f{i}_plus" for i in range(8)} | {"nfnet_hub_nano"}
    assert names == expected


@pytest.mark.parametrize("variant", sorted(AUTHORS))
def test_size_matches_the_authors_table(variant):
    stats = model_stats(f"nfnet_hub_{variant}", VARIANTS[variant].test_size)
    params, gmacs = AUTHORS[variant]
    assert stats.params / 1e6 == pytest.approx(params, abs=0.05)
    assert stats.gmacs == pytest.approx(gmacs, abs=0.01)


def test_plus_variants_are_wider_and_nano_is_tiny():
    f0, f0p = model_stats("nfnet_hub_f0", 64), model_stats("nfnet_hub_f0_plus", 64)
    assert f0p.params > 1.5 * f0.params
    assert model_cfg("f3_plus").widths == (384, 768, 2048, 2048)
    assert model_cfg("f3_plus").depths == model_cfg("f3").depths
    assert 100_000 < model_stats("nfnet_hub_nano", 32, num_classes=10).params < 500_000


def test_unknown_variant_names_the_valid_ones():
    with pytest.raises(ValueError, match="nfnet_hub_f0.*nfnet_hub_nano"):
        create_model("nfnet_hub_f9")
    with pytest.raises(ValueError, match="f0, f1"):
        model_cfg("f9")


def test_recipe_facts_per_variant():
    assert [VARIANTS[f"f{i}"].drop_rate for i in range(8)] == [0.2, 0.3, 0.4, 0.4, 0.5, 0.5, 0.5, 0.5]
    m = timm.create_model("nfnet_hub_f2", pretrained=False)
    assert m.pretrained_cfg["input_size"] == (3, 256, 256)
    assert m.pretrained_cfg["test_input_size"] == (3, 352, 352)
    assert m.drop_rate == 0.4
    # expected std resets after each stage's first block, then grows by alpha^2 per block
    assert [b.beta for b in m.stages[2]][:3] == pytest.approx([1 / (1 + 0.04 * len(m.stages[1])) ** 0.5,
                                                               1 / (1 + 0.04) ** 0.5, 1 / (1 + 0.08) ** 0.5])


@pytest.mark.parametrize("variant,size", [("f0", 192), ("f0", 256)])
def test_logits_equal_timm_dm_nfnet_at_train_and_test_size(variant, size):
    ref = randomise(timm.create_model(f"dm_nfnet_{variant}"))
    ours = timm.create_model(f"nfnet_hub_{variant}").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert rel_error(ours(x), ref(x)) <= 1e-5


def test_timm_state_dicts_load_unchanged_for_every_published_variant():
    """Every variant takes timm's state dict as it is (names and shapes, on the meta device); F1 computes what
    timm's computes from it (F0 above), the deeper variants differing from it only in their table's numbers."""
    for variant in ("f1", "f2", "f3", "f4", "f5", "f6"):
        with torch.device("meta"):
            ref, ours = timm.create_model(f"dm_nfnet_{variant}"), timm.create_model(f"nfnet_hub_{variant}")
        ours.load_state_dict(ref.state_dict())  # strict: a missing, extra or reshaped tensor fails
    ref = randomise(timm.create_model("dm_nfnet_f1"), seed=1)
    ours = timm.create_model("nfnet_hub_f1").eval()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(ours(x), ref(x)) <= 1e-5


def test_pretrained_tag_points_at_timm_weights_and_loads_through_timm(tmp_path):
    m = timm.create_model("nfnet_hub_f0.dm_in1k", pretrained=False)
    assert m.pretrained_cfg["hf_hub_id"] == "timm/dm_nfnet_f0.dm_in1k"
    ref = randomise(timm.create_model("dm_nfnet_f0"), seed=2)
    save_safetensors(ref, tmp_path / "model.safetensors")
    loaded = timm.create_model("nfnet_hub_f0.dm_in1k", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "model.safetensors"))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert rel_error(loaded(x), ref(x)) <= 1e-5


def test_timm_interfaces():
    m = randomise(timm.create_model("nfnet_hub_nano", num_classes=7))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = m.forward_features(x)
        assert feats.shape == (2, m.num_features, 2, 2)
        torch.testing.assert_close(m.forward_head(feats), m(x))
        assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
        final, inter = m.forward_intermediates(x)
        torch.testing.assert_close(final, feats)
        assert [t.shape[-1] for t in inter] == [32, 16, 8, 4, 2]
        cl = m.to(memory_format=torch.channels_last)
        torch.testing.assert_close(cl(x.contiguous(memory_format=torch.channels_last)), m(x), rtol=1e-4, atol=1e-5)
    assert m.get_classifier().out_features == 7
    m.reset_classifier(3)
    assert m(x).shape == (2, 3)
    fm = timm.create_model("nfnet_hub_nano", features_only=True)
    outs = fm(x)
    assert fm.feature_info.channels() == [o.shape[1] for o in outs]
    assert fm.feature_info.reduction() == [2, 4, 8, 16, 32]


def test_factory_arguments_and_a_classifier_after_pruning():
    """timm's device/dtype factory arguments reach every tensor; a classifier reset after pruning is sized by
    the pruned features and made where the model is (timm's own suite checks more: tests/test_timm_suite.py)."""
    meta = timm.create_model("nfnet_hub_f0", device="meta", dtype=torch.float64)
    assert {(t.device.type, t.dtype) for t in [*meta.parameters(), *meta.buffers()]} == {("meta", torch.float64)}
    m = randomise(timm.create_model("nfnet_hub_nano")).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tap = m.forward_intermediates(x, indices=[2], intermediates_only=True)[0]
        m.prune_intermediate_layers([2])
        torch.testing.assert_close(m.forward_features(x), tap)
        m.reset_classifier(5, "avg")  # pruning took the pooling away with the head, as in timm
        assert m(x).shape == (2, 5) and not m.head.fc.training
        torch.testing.assert_close(m(x), m.head.fc(tap.mean((2, 3))))
    m.to(torch.float64).reset_classifier(4)
    assert m.get_classifier().weight.dtype == torch.float64


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    m = randomise(timm.create_model("nfnet_hub_nano", num_classes=5, drop_rate=0.0)).train()
    x = torch.randn(2, 3, 32, 32)
    m(x).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_grad_checkpointing(True)
    m(x).sum().backward()
    for g, p in zip(grads, m.parameters()):
        torch.testing.assert_close(p.grad, g)


def test_drop_rates_and_authors_stochastic_depth():
    m = timm.create_model("nfnet_hub_f0", drop_rate=0.3, drop_path_rate=0.25)
    assert m.head.drop.p == 0.3
    rates = [getattr(b.drop_path, "rate", 0.0) for s in m.stages for b in s]
    assert rates == pytest.approx([0.25 * i / 12 for i in range(12)])
    sd = m.stages[3][2].drop_path
    sd.train()
    x = torch.ones(4000, 1, 1, 1)
    y = sd(x)
    assert set(y.unique().tolist()) <= {0.0, 1.0}  # the authors do not rescale kept samples
    assert 0.2 < (y == 0).float().mean() < 0.3


def test_torch_compile_matches_eager():
    """Dynamo traces the model whole (no graph break) and AOTAutograd, with inductor's decompositions and
    partitioner, derives its backward: everything torch.compile does to the model short of generating kernels.
    Those are torch's, and inductor's CPU C++ takes over a minute to build on 2 cores (and torch 2.14.1's vectorised
    CPU code is broken for small weight-standardised networks: README)."""
    m = randomise(timm.create_model("nfnet_hub_nano", num_classes=4, drop_rate=0.0, drop_path_rate=0.0)).train()
    x = torch.randn(4, 3, 64, 64)
    torch._dynamo.reset()
    try:
        compiled = torch.compile(m, backend="aot_eager_decomp_partition", fullgraph=True)(x)
        compiled.square().mean().backward()
    finally:  # dynamo would remember this batch size, and trace the next compile of the model with dynamic shapes
        torch._dynamo.reset()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    eager = m(x)
    eager.square().mean().backward()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-6, msg=n)


def test_checkpoint_errors_list_every_problem(tmp_path):
    m = timm.create_model("nfnet_hub_nano", num_classes=10)
    sd = m.state_dict()
    del sd["stem.conv1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    sd["head.fc.bias"] = torch.zeros(3)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(m, tmp_path / "bad.pth")
    text = str(e.value)
    assert "missing (1): stem.conv1.weight" in text
    assert "unexpected (1): extra.weight" in text
    assert "mis-shaped (1): head.fc.bias: (3,) != (10,)" in text
    assert text.startswith(f"{tmp_path / 'bad.pth'} does not fit nfnet_hub_nano:")  # no variant holds these tensors
    with torch.device("meta"):  # another variant's tensors, at other class and channel counts: named
        sd = timm.create_model("nfnet_hub_f1_plus", num_classes=7, in_chans=1).state_dict()
    with pytest.raises(CheckpointError, match=r"^checkpoint does not fit nfnet_hub_nano \(its tensors are "
                                              r"nfnet_hub_f1_plus's: give that model name\):"):
        check_fit(sd, m)


def test_pickled_checkpoints_load_weights_only(tmp_path):
    m = randomise(timm.create_model("nfnet_hub_nano", num_classes=10))
    torch.save({"state_dict": m.state_dict(), "epoch": 3}, tmp_path / "ok.pth")
    loaded = create_model("nfnet_hub_nano", tmp_path / "ok.pth")
    torch.testing.assert_close(loaded.state_dict(), m.state_dict())

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors") as e:
        read_state_dict(tmp_path / "evil.pth")
    assert "weights_only=False" not in str(e.value)  # never advise loading untrusted pickles
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.safetensors")


def test_state_dicts_of_wrapped_models_load_as_timm_loads_them(tmp_path):
    """torch.save(torch.compile(model).state_dict()) and DDP's keys: prefixes timm's loader strips."""
    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    m = randomise(timm.create_model("nfnet_hub_nano", num_classes=10))
    compiled = torch.compile(m).state_dict()  # the real wrapper's keys (nothing compiles before a call)
    assert all(k.startswith("_orig_mod.") for k in compiled)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.compile(DistributedDataParallel(m)).state_dict()  # "_orig_mod.module.stem..."
    finally:
        dist.destroy_process_group()
    torch.save({"state_dict": compiled}, tmp_path / "compiled.pth")
    torch.save(ddp, tmp_path / "ddp.pth")
    save_file({k: v.contiguous() for k, v in compiled.items()}, tmp_path / "compiled.safetensors")
    for name in ("compiled.pth", "ddp.pth", "compiled.safetensors"):
        loaded = create_model("nfnet_hub_nano", tmp_path / name)
        torch.testing.assert_close(loaded.state_dict(), m.state_dict())
    save_file({k: v.bfloat16().contiguous() for k, v in m.state_dict().items()}, tmp_path / "bf16.safetensors")
    loaded = create_model("nfnet_hub_nano", tmp_path / "bf16.safetensors")  # weights saved from a bf16 model
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, m.state_dict()[k].bfloat16().float())


def test_import_order_does_not_matter():
    import subprocess
    import sys

    for code in ("import nfnet_hub, timm", "import timm, nfnet_hub"):
        out = subprocess.run([sys.executable, "-c", f"{code}; print(len(timm.list_models('nfnet_hub_*')))"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "17", out.stderr


def test_list_command_prints_the_readme_table_from_the_variant_table_without_torch():
    """`nfnet-hub list` reads counts from the variant table: it imports no torch and builds nothing."""
    import subprocess
    import sys
    from pathlib import Path

    from nfnet_hub.models.variants import table

    code = "import sys; from nfnet_hub.cli import main; main(['list']); assert 'torch' not in sys.modules, 'torch'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 18 and lines[0].split() == ["model", "params", "GMACs", "train", "/", "test", "train", "/",
                                                     "test", "px", "dropout", "pretrained"]
    f0 = next(line for line in lines if line.startswith("nfnet_hub_f0 "))
    assert f0.split() == ["nfnet_hub_f0", "71.5M", "6.98", "/", "12.38", "192", "/", "256", "0.2", "dm_in1k,",
                          "deepmind_in1k"]
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert table(markdown=True) in readme  # the README shows what the command prints


def test_counts_in_the_variant_table_are_those_of_built_models():
    from nfnet_hub.models.nfnet import default_cfgs
    from nfnet_hub.models.variants import COUNTS, pretrained_tags

    for variant in VARIANTS:
        with torch.device("meta"):
            params = sum(p.numel() for p in timm.create_model(f"nfnet_hub_{variant}").parameters())
        assert COUNTS[variant].params == params, variant
        assert pretrained_tags(variant) == [t for t in default_cfgs[f"nfnet_hub_{variant}"].tags if t]
    for variant in ("nano", "f0", "f0_plus", "f3"):  # multiply-adds are slow to count: one of each kind
        v, counts = VARIANTS[variant], COUNTS[variant]
        assert model_stats(f"nfnet_hub_{variant}", v.train_size).gmacs == pytest.approx(counts.gmacs_train, rel=1e-4)
        assert model_stats(f"nfnet_hub_{variant}", v.test_size).gmacs == pytest.approx(counts.gmacs_test, rel=1e-4)
