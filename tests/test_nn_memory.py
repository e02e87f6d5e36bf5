"""gk.nn.MemoryLayer: equal to an explicit hash + gather with the same parameters, its
initialisation scale, the shared-hash Q/K/V option, state_dict, compile, autocast, errors."""
import pytest
import torch
from torch import nn

import gtkernels as gk
from gtkernels.reference import hashing as ref
from utils import DEVICE_PARAMS


def explicit_memory_layer(layer, x):
    """The layer written out: sign hash, gather [..., K, d_out], weighted sum, bias."""
    chunks = x.unflatten(-1, (-1, layer.tau))                            # [..., K, tau]
    bits = 2 ** torch.arange(layer.tau - 1, -1, -1, device=x.device)
    codes = ((chunks >= 0).long() * bits).sum(-1)                        # [..., K]
    weights = ref.hash_weights(x, layer.tau, layer.weighting, layer.temperature)
    chunk_ids = torch.arange(codes.shape[-1], device=x.device)
    tables = layer.tables if layer.num_projections > 1 else layer.tables.unsqueeze(0)
    outs = []
    for m, table in enumerate(tables):
        y = (weights.unsqueeze(-1) * table[chunk_ids, codes]).sum(-2)
        if layer.bias is not None:
            y = y + (layer.bias if layer.num_projections == 1 else layer.bias[m])
        outs.append(y)
    return outs[0] if layer.num_projections == 1 else tuple(outs)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("weighting", ["softmax", "l1_softmax", "none"])
@pytest.mark.parametrize("num_projections,bias", [(1, True), (1, False), (3, True)])
def test_memory_layer_matches_explicit_reference(device, weighting, num_projections, bias):
    layer = gk.nn.MemoryLayer(24, 10, tau=4, weighting=weighting, bias=bias, temperature=0.7,
                              num_projections=num_projections, device=device,
                              dtype=torch.float64)
    x = torch.randn(3, 5, 24, device=device, dtype=torch.float64, requires_grad=True)
    got, want = layer(x), explicit_memory_layer(layer, x)
    got, want = (got, want) if num_projections > 1 else ((got,), (want,))
    for g, w in zip(got, want):
        assert g.shape == (3, 5, 10)
        torch.testing.assert_close(g, w)
    grad_outs = [torch.randn_like(w) for w in want]
    params = [x] + list(layer.parameters())
    got_grads = torch.autograd.grad(got, params, grad_outs)
    want_grads = torch.autograd.grad(want, params, grad_outs, materialize_grads=True)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("weighting,temperature,tau", [("softmax", 1.0, 8), ("softmax", 0.5, 4),
                                                       ("l1_softmax", 1.0, 6), ("none", 1.0, 8)])
def test_memory_layer_init_matches_linear_output_variance(weighting, temperature, tau):
    torch.manual_seed(0)
    x = torch.randn(4096, 240)
    layer = gk.nn.MemoryLayer(240, 256, tau=tau, weighting=weighting, temperature=temperature,
                              bias=False)
    linear = nn.Linear(240, 256, bias=False)
    with torch.no_grad():
        ratio = layer(x).var() / linear(x).var()
    assert 0.85 < ratio.item() < 1.15, f"output variance ratio to nn.Linear: {ratio.item():.3f}"


def test_memory_layer_is_a_drop_in_for_linear():
    model = nn.Sequential(nn.LayerNorm(32), gk.nn.MemoryLayer(32, 16), nn.GELU(), nn.Linear(16, 4))
    x = torch.randn(8, 32)
    loss = model(x).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_memory_layer_shared_hash_uses_one_lookup_for_qkv():
    layer = gk.nn.MemoryLayer(16, 8, tau=4, num_projections=3)
    assert layer.tables.shape == (3, 4, 16, 8) and layer.bias.shape == (3, 8)
    x = torch.randn(2, 7, 16)
    q, k, v = layer(x)
    for m, out in enumerate((q, k, v)):
        single = gk.hashed_lookup(x, layer.tables[m], tau=4, bias=layer.bias[m])
        torch.testing.assert_close(out, single)


def test_memory_layer_state_dict_round_trip_and_repr():
    layer = gk.nn.MemoryLayer(32, 12, tau=8, weighting="l1_softmax", num_projections=2)
    clone = gk.nn.MemoryLayer(32, 12, tau=8, weighting="l1_softmax", num_projections=2)
    clone.load_state_dict(layer.state_dict())
    x = torch.randn(5, 32)
    for a, b in zip(layer(x), clone(x)):
        assert torch.equal(a, b)
    text = repr(layer)
    for field in ("in_features=32", "out_features=12", "tau=8", "'l1_softmax'",
                  "num_projections=2", "bias=True"):
        assert field in text


def test_memory_layer_compiles_without_graph_break():
    layer = gk.nn.MemoryLayer(24, 8, tau=6)
    x = torch.randn(4, 24, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    got, want = compiled(x), layer(x)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), [x, layer.tables])
    g_want = torch.autograd.grad(want.sum(), [x, layer.tables])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


def test_memory_layer_autocast_bf16_cpu():
    layer = gk.nn.MemoryLayer(32, 16, tau=8, num_projections=3)
    x = torch.randn(6, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = layer(x)
        loss = (q * k + v).float().square().mean()
    assert q.dtype == torch.bfloat16
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert torch.isfinite(layer.tables.grad).all() and layer.tables.grad.dtype == torch.float32


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_features=30, out_features=4, tau=8), r"in_features \(30\) must be a positive "
                                                  r"multiple of tau \(8\)"),
    (dict(in_features=32, out_features=4, tau=13), r"tau must be in \[1, 12\]"),
    (dict(in_features=32, out_features=4, weighting="max"), "weighting must be one of"),
    (dict(in_features=32, out_features=4, temperature=0.0), "temperature must be positive"),
    (dict(in_features=32, out_features=4, num_projections=0), "num_projections must be in"),
])
def test_memory_layer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gk.nn.MemoryLayer(**kwargs)


def test_memory_layer_rejects_wrong_input_width():
    with pytest.raises(ValueError, match="tables must be"):
        gk.nn.MemoryLayer(32, 4, tau=8)(torch.randn(2, 40))


@pytest.mark.gpu
def test_memory_layer_cuda_equals_cpu():
    layer = gk.nn.MemoryLayer(256, 128, tau=8, num_projections=3)
    layer_cuda = gk.nn.MemoryLayer(256, 128, tau=8, num_projections=3).cuda()
    layer_cuda.load_state_dict(layer.state_dict())
    x = torch.randn(1000, 256)
    for a, b in zip(layer(x), layer_cuda(x.cuda())):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
