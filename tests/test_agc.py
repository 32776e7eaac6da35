"""AGC against an independent numpy implementation of the authors' formula."""
from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
from conftest import randomise
from torch import nn

from nfnet_hub import agc_triton
from nfnet_hub.agc import adaptive_clip_grad_, agc_parameters, patch_timm


def numpy_agc(w: np.ndarray, g: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    """The authors' agc_optax.py, unit by unit: rows of matrices, whole scalars and vectors."""
    w64, g64 = w.astype(np.float64), g.astype(np.float64)
    if w.ndim <= 1:
        w64, g64 = w64.reshape(1, -1), g64.reshape(1, -1)
    else:
        w64, g64 = w64.reshape(w.shape[0], -1), g64.reshape(g.shape[0], -1)
    out = g64.copy()
    for i in range(w64.shape[0]):
        max_norm = clipping * max(np.sqrt((w64[i] ** 2).sum()), eps)
        gn = np.sqrt((g64[i] ** 2).sum())
        if gn > max_norm:
            out[i] = g64[i] * max_norm / max(gn, 1e-6)
    return out.reshape(g.shape)


def _cases():
    rng = np.random.default_rng(0)
    conv_w = rng.standard_normal((6, 3, 3, 3)).astype(np.float32)
    conv_w[2] = 0.0  # a zero-norm unit: eps decides its budget
    conv_g = (rng.standard_normal((6, 3, 3, 3)) * np.array([1e-4, 10, 1e-3, 1e-5, 5, 0])[:, None, None, None])
    lin_w = rng.standard_normal((5, 7)).astype(np.float32)
    lin_g = rng.standard_normal((5, 7)) * np.array([1e-4, 1, 1e-4, 1, 0.0])[:, None]
    bias_w, bias_g = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4) * 5
    scalar_w, scalar_g = np.float32(0.3), np.float64(-0.5)
    small_w, small_g = rng.standard_normal(3).astype(np.float32), rng.standard_normal(3) * 1e-5
    # matrices sharing a fan-in (27: 3x3x3 kernels; 7: the linear layers) are reduced together when grouped
    conv2_w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv2_g = rng.standard_normal((4, 3, 3, 3)) * np.array([3, 1e-5, 1, 1e-4])[:, None, None, None]
    lin2_w, lin2_g = rng.standard_normal((3, 7)).astype(np.float32), rng.standard_normal((3, 7)) * 2
    # a gain: one weight per output row, so each row's norm is the absolute value
    gain_w = np.array([1.0, -0.5, 0.0, 2.0], np.float32).reshape(4, 1, 1, 1)
    gain_g = np.array([0.5, -1e-5, 1e-6, -3.0]).reshape(4, 1, 1, 1)
    # long rows and a long vector, which the Triton kernel reads in several blocks, in tiles of one row
    # or (with other tile shapes) of several, the last one part full
    wide_w, wide_g = rng.standard_normal((3, 1500)).astype(np.float32), rng.standard_normal((3, 1500)) * 0.1
    mid_w, mid_g = rng.standard_normal((3, 600)).astype(np.float32), rng.standard_normal((3, 600)) * 0.03
    huge_w = rng.standard_normal((2, 2500)).astype(np.float32)
    huge_g = rng.standard_normal((2, 2500)) * np.array([1e-4, 1.0])[:, None]
    long_w, long_g = rng.standard_normal(3000).astype(np.float32), rng.standard_normal(3000) * 0.05
    return [(conv_w, conv_g), (lin_w, lin_g), (bias_w, bias_g), (np.array(scalar_w), np.array(scalar_g)),
            (conv2_w, conv2_g), (small_w, small_g), (gain_w, gain_g), (lin2_w, lin2_g),
            (wide_w, wide_g), (mid_w, mid_g), (huge_w, huge_g), (long_w, long_g)]


def _params(cases, dtype=torch.float32) -> list[nn.Parameter]:
    params = []
    for w, g in cases:
        p = nn.Parameter(torch.from_numpy(np.array(w, np.float32)).to(dtype))
        p.grad = torch.from_numpy(np.array(g, np.float32)).to(dtype)
        params.append(p)
    return params


needs_triton = pytest.mark.skipif(not agc_triton.available(torch.device("cpu")),
                                  reason="Triton is not installed (CPU-only torch)")
METHODS = ["per_tensor", "grouped", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("clipping,eps", [(0.01, 1e-3), (0.1, 1e-3), (0.05, 1e-2)])
def test_matches_the_authors_formula(clipping, eps, method):
    cases = _cases()
    params = _params(cases)
    adaptive_clip_grad_(params, clipping, eps, method=method)
    clipped_any = unclipped_any = False
    for p, (w, g) in zip(params, cases):
        expected = numpy_agc(np.array(w), np.array(g, np.float32), clipping, eps)
        np.testing.assert_allclose(p.grad.numpy(), expected, rtol=2e-6, atol=1e-12)
        changed = ~np.isclose(expected, np.array(g, np.float32), rtol=0, atol=0)
        clipped_any |= bool(changed.any())
        unclipped_any |= bool((~changed).any())
    assert clipped_any and unclipped_any  # the cases exercise both branches


@needs_triton
def test_triton_kernel_with_other_tile_shapes(monkeypatch):
    """Tiles of several rows that loop over long rows, some clipped and some not: what tuning may choose."""
    launch = agc_triton._Launch
    monkeypatch.setattr(agc_triton, "_LAUNCHES", (launch(8, 4, 8, 1), launch(math.inf, 2, 512, 4)))
    cases = _cases()
    params = _params(cases)
    adaptive_clip_grad_(params, 0.01, method="triton")
    for p, (w, g) in zip(params, cases):
        np.testing.assert_allclose(p.grad.numpy(), numpy_agc(np.array(w), np.array(g, np.float32), 0.01, 1e-3),
                                   rtol=2e-6, atol=1e-12)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_in_half_precision(dtype):
    """Half-precision weights and gradients: norms accumulate in float32, the result is rounded once."""
    cases = _cases()
    params = _params(cases, dtype)
    inputs = [(p.detach().float().numpy(), p.grad.float().numpy()) for p in params]
    adaptive_clip_grad_(params, 0.01, method="triton")
    for p, (w, g) in zip(params, inputs):
        expected = torch.from_numpy(numpy_agc(w, g, 0.01, 1e-3)).to(dtype)  # rounded as the kernel rounds
        torch.testing.assert_close(p.grad.float(), expected.float(), rtol=8e-3, atol=1e-12)
        assert p.grad.dtype == dtype


@needs_triton
def test_triton_method_says_what_it_needs(monkeypatch):
    transposed = nn.Parameter(torch.randn(5, 4))
    transposed.grad = torch.randn(4, 5).t()  # rows are strided, not dense
    with pytest.raises(ValueError, match="dense rows"):
        adaptive_clip_grad_([transposed], method="triton")
    expected = torch.from_numpy(numpy_agc(transposed.detach().numpy(), transposed.grad.numpy(), 0.01, 1e-3))
    adaptive_clip_grad_([transposed], method="auto")  # torch ops: on a CPU, and for strided rows anywhere
    torch.testing.assert_close(transposed.grad, expected.float())
    monkeypatch.delenv("TRITON_INTERPRET")
    p = nn.Parameter(torch.randn(3, 3))
    p.grad = torch.randn(3, 3)
    with pytest.raises(ValueError, match="needs Triton, a GPU"):
        adaptive_clip_grad_([p], method="triton")
    with pytest.raises(ValueError, match="unknown AGC method"):
        adaptive_clip_grad_([p], method="fused")


@pytest.mark.parametrize("method,channels_last", [  # Triton in its CPU interpreter is slow: in the harder layout only
    ("per_tensor", False), ("per_tensor", True), ("grouped", False), ("grouped", True),
    pytest.param("triton", True, marks=needs_triton)],
    ids=lambda v: {False: "contiguous", True: "channels_last"}.get(v, v))
def test_matches_timm_on_a_real_network_gradient(method, channels_last):
    from timm.utils.agc import adaptive_clip_grad

    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=10)).train()
    if channels_last:  # conv weights and their gradients in channels-last layout: rows stay dense
        model = model.to(memory_format=torch.channels_last)
    model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean().backward()
    params = agc_parameters(model)
    if method == "triton":  # its CPU interpreter runs each program in Python: every 8th tensor, of every kind
        params = params[::8]
    grads = [p.grad.clone() for p in params]
    assert channels_last == any(g.is_contiguous(memory_format=torch.channels_last) and not g.is_contiguous()
                                for g in grads)
    adaptive_clip_grad(params, 0.01)
    expected = [p.grad.clone() for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    adaptive_clip_grad_(params, 0.01, method=method)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    clipped = [i for i, (e, g) in enumerate(zip(expected, grads)) if not torch.equal(e, g)]
    assert clipped
    # again, with the same gradient tensors but one: the Triton kernel's table of pointers must follow it
    for p, g in zip(params, grads):
        p.grad.copy_(g)
    old = params[clipped[-1]].grad  # kept alive, so that the new one cannot take its address
    params[clipped[-1]].grad = grads[clipped[-1]].clone()
    adaptive_clip_grad_(params, 0.01, method=method)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e)
    assert old.data_ptr() != params[clipped[-1]].grad.data_ptr()


def test_classifier_is_found_by_identity_not_order():
    class HeadFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)  # registered first: "the last two parameters" would be wrong
            self.body = nn.Linear(4, 4)

        def get_classifier(self):
            return self.fc

    m = HeadFirst()
    assert {id(p) for p in agc_parameters(m)} == {id(m.body.weight), id(m.body.bias)}
    authors = agc_parameters(m, "authors")
    assert {id(p) for p in authors} == {id(m.body.weight), id(m.body.bias), id(m.fc.bias)}
    with pytest.raises(ValueError, match="unknown AGC partition"):
        agc_parameters(m, "nope")
    nano = timm.create_model("nfnet_hub_nano")
    names = {id(p): n for n, p in nano.named_parameters()}
    assert not [names[id(p)] for p in agc_parameters(nano) if names[id(p)].startswith("head.")]


def test_wrapped_models_are_looked_into(tmp_path):
    """A DDP loop calls agc_parameters(ddp_model): the wrapper shares the model's parameters, so the same ones."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    nano = timm.create_model("nfnet_hub_nano", num_classes=10)
    expected = [id(p) for p in agc_parameters(nano)]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for wrapped in (DistributedDataParallel(nano), nn.DataParallel(DistributedDataParallel(nano)),
                        torch.compile(nano)):
            assert [id(p) for p in agc_parameters(wrapped)] == expected
        with pytest.raises(ValueError, match=r"FSDP1\) flattens parameters .* fully_shard \(FSDP2"):
            # its one flat parameter, clipped as one unit, would be a silent wrong result
            agc_parameters(FullyShardedDataParallel(timm.create_model("nfnet_hub_nano"), device_id=torch.device("cpu")))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("clipping,eps,message", [
    (-0.01, 1e-3, "clipping=-0.01: a finite number >= 0"),  # would flip the sign of every clipped gradient
    (math.nan, 1e-3, "clipping=nan"),  # would clip nothing
    (0.01, -1e-3, "eps=-0.001: a finite number >= 0"),
    (0.01, math.inf, "eps=inf"),
])
def test_settings_that_would_train_on_quietly_are_refused(clipping, eps, message):
    params = _params(_cases())
    grads = [p.grad.clone() for p in params]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        adaptive_clip_grad_(params, clipping, eps)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads))
    adaptive_clip_grad_(params, 0.0)  # the formula's limit, allowed: every gradient clipped to zero
    assert all(not p.grad.any() for p in params)
    with pytest.raises(TypeError, match=r"not \(name, parameter\) pairs"):
        adaptive_clip_grad_(nn.Linear(2, 2).named_parameters())


def test_after_unscaling_under_mixed_precision():
    torch.manual_seed(0)
    model = randomise(timm.create_model("nfnet_hub_nano", num_classes=10, drop_rate=0.0)).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nn.functional.cross_entropy(model(x), y).backward()
    adaptive_clip_grad_(agc_parameters(model), 0.01)
    expected = [p.grad.clone() for p in model.parameters()]
    opt.zero_grad()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    adaptive_clip_grad_(agc_parameters(model), 0.01)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-8)


def test_timm_dispatch_uses_ours_after_patch(monkeypatch):
    import timm.utils.clip_grad as cg

    monkeypatch.setattr(cg, "adaptive_clip_grad", cg.adaptive_clip_grad)
    patch_timm()
    p = nn.Parameter(torch.ones(2, 3))
    p.grad = torch.full((2, 3), 10.0)
    cg.dispatch_clip_grad([p], 0.01, mode="agc")
    assert cg.adaptive_clip_grad.__module__ == "nfnet_hub.agc"
    torch.testing.assert_close(p.grad.norm(dim=1), torch.full((2,), 0.01 * 3 ** 0.5))


def test_timm_train_script_runs_with_our_agc(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "train.py"  # stands in for timm's train.py: the same call it makes for --clip-mode agc
    script.write_text("import sys, torch\nfrom timm.utils import dispatch_clip_grad\nimport timm.utils.clip_grad as c\n"
                      "p = torch.nn.Parameter(torch.ones(2, 3)); p.grad = torch.full((2, 3), 10.0)\n"
                      "dispatch_clip_grad([p], float(sys.argv[2]), mode=sys.argv[1])\n"
                      "print(c.adaptive_clip_grad.__module__, round(float(p.grad.norm(dim=1)[0]), 5))\n")
    out = subprocess.run([sys.executable, "-m", "nfnet_hub.cli", "timm-train", str(script), "agc", "0.01"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["nfnet_hub.agc", str(round(0.01 * 3 ** 0.5, 5))]
