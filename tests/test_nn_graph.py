"""gtkernels.nn graph layers and positional encodings against dense pure-torch forwards."""
import copy
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gtkernels as gk
from tests.nn_graph_reference import (coalesced_edge_index, dense_attention,
                                      dense_graph_attention, dense_transformer_layer,
                                      window_global_mask)
from tests.utils import DEVICE_PARAMS, assert_within_tolerance

N, DIM, HEADS, EDGE_DIM = 13, 12, 3, 4


def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def make_inputs(edge_dim=None, dtype=torch.float64, isolated=2):
    edge_index = coalesced_edge_index(N, 40, isolated=isolated)
    x = torch.randn(N, DIM, dtype=dtype)
    edge_attr = None if edge_dim is None else \
        torch.randn(edge_index.shape[1], edge_dim, dtype=dtype)
    return x, edge_index, edge_attr


@pytest.mark.parametrize("edge_dim", [None, EDGE_DIM])
@pytest.mark.parametrize("graph_kind", ["graph", "edge_index", "pyg_data"])
def test_graph_attention_matches_dense(edge_dim, graph_kind):
    x, edge_index, edge_attr = make_inputs(edge_dim)
    layer = gk.nn.GraphAttention(DIM, HEADS, edge_dim=edge_dim).double()
    graph = {"graph": gk.Graph.from_edge_index(edge_index, N), "edge_index": edge_index,
             "pyg_data": SimpleNamespace(edge_index=edge_index, num_nodes=N,
                                         edge_attr=edge_attr)}[graph_kind]
    out, scores = layer(x, graph, None if graph_kind == "pyg_data" else edge_attr,
                        return_edge_scores=True)
    ref_out, ref_scores = dense_graph_attention(layer, x, edge_index, edge_attr)
    close(out, ref_out)
    close(scores, ref_scores)


def test_edge_index_graph_is_cached_until_edited():
    x, edge_index, _ = make_inputs()
    layer = gk.nn.GraphAttention(DIM, HEADS).double()
    layer(x, edge_index)
    first = layer._graph_cache._graph
    layer(x, edge_index)
    assert layer._graph_cache._graph is first
    edge_index[0] = (edge_index[0] + 1) % N  # in place: pairs stay unique
    out = layer(x, edge_index)
    assert layer._graph_cache._graph is not first
    close(out, dense_graph_attention(layer, x, edge_index)[0])


@pytest.mark.parametrize("norm", ["layer", "batch"])
@pytest.mark.parametrize("edge_dim", [None, EDGE_DIM])
@pytest.mark.parametrize("pre_norm", [False, True])
def test_transformer_layer_matches_dense(norm, edge_dim, pre_norm):
    x, edge_index, edge_attr = make_inputs(edge_dim)
    x.requires_grad_(True)
    layer = gk.nn.GraphTransformerLayer(DIM, HEADS, norm=norm, edge_dim=edge_dim,
                                        pre_norm=pre_norm).double()
    g = gk.Graph.from_edge_index(edge_index, N)
    out = layer(x, g, edge_attr)
    ref = dense_transformer_layer(layer, x, edge_index, edge_attr)
    outs, refs = (out, ref) if edge_dim else ((out,), (ref,))
    weights = [torch.randn_like(t) for t in outs]
    for o, r in zip(outs, refs):
        close(o, r)
    params = [x] + list(layer.parameters())
    grads = torch.autograd.grad(sum((w * o).sum() for w, o in zip(weights, outs)), params)
    ref_grads = torch.autograd.grad(sum((w * r).sum() for w, r in zip(weights, refs)), params)
    for grad, ref_grad in zip(grads, ref_grads):
        close(grad, ref_grad, 1e-9)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_float32_layer_on_device_within_tolerance_of_float64(device):
    x, edge_index, edge_attr = make_inputs(EDGE_DIM)
    layer = gk.nn.GraphTransformerLayer(DIM, HEADS, norm="batch", edge_dim=EDGE_DIM).double()
    ref64 = dense_transformer_layer(layer, x, edge_index, edge_attr)
    layer32 = copy.deepcopy(layer).float()
    ref32 = dense_transformer_layer(layer32, x.float(), edge_index, edge_attr.float())
    g = gk.Graph.from_edge_index(edge_index.to(device), N)
    out = layer32.to(device)(x.float().to(device), g, edge_attr.float().to(device))
    for name, o, r64, r32 in zip(("x", "e"), out, ref64, ref32):
        assert_within_tolerance(o.cpu(), r64, r32, floor=1e-5, name=name)


@pytest.mark.parametrize("edge_dim", [None, EDGE_DIM])
def test_attention_with_window_and_globals_matches_dense_union(edge_dim):
    x, edge_index, edge_attr = make_inputs(edge_dim)
    layer = gk.nn.GraphAttention(DIM, HEADS, edge_dim=edge_dim, window=2, dilation=3).double()
    globals_ = torch.tensor([4, 9])
    out = layer(x, gk.Graph.from_edge_index(edge_index, N), edge_attr, global_nodes=globals_)
    extra = window_global_mask(N, 2, 3, globals_)
    close(out, dense_graph_attention(layer, x, edge_index, edge_attr, extra_mask=extra)[0])


def test_transformer_layer_with_window_and_globals_matches_dense_union():
    x, edge_index, _ = make_inputs()
    g = gk.Graph.from_edge_index(edge_index, N)
    layer = gk.nn.GraphTransformerLayer(DIM, HEADS, window=2, dilation=3, pre_norm=True).double()
    globals_ = torch.tensor([4, 9])
    out = layer(x, g, global_nodes=globals_)
    layer.attn.attention_fn = dense_union_attention
    close(out, layer(x, g, global_nodes=globals_))


def dense_union_attention(q, k, v, g, *, edge_attr=None, window=0, dilation=1, global_nodes=None):
    """Adjacency + window + globals, densely (what gk.graph_attention's union computes)."""
    n = q.shape[0]
    src, dst = g.edge_index()
    mask = window_global_mask(n, window, dilation, global_nodes)
    mask[dst, src] = True
    assert edge_attr is None
    return dense_attention(q, k, v, mask)[0]


def test_dense_union_reference_equals_window_attention_on_an_edgeless_graph():
    q, k, v = torch.randn(3, N, HEADS, 5, dtype=torch.float64).unbind(0)
    empty = gk.Graph.from_edge_index(torch.zeros(2, 0, dtype=torch.int64), N)
    out = dense_union_attention(q, k, v, empty, window=2, dilation=3, global_nodes=torch.arange(2))
    close(out, gk.window_attention(q, k, v, 2, 3, num_global=2))


def test_layer_passes_window_dilation_and_globals_to_the_attention():
    x, edge_index, _ = make_inputs()
    layer = gk.nn.GraphTransformerLayer(DIM, HEADS, window=2, dilation=3, pre_norm=True).double()
    layer.attn.attention_fn = dense_union_attention
    globals_ = torch.tensor([4, 9])
    out = layer(x, gk.Graph.from_edge_index(edge_index, N), global_nodes=globals_)
    extra = window_global_mask(N, 2, 3, globals_)
    x_in = layer.norm_attn(x)
    h = x + dense_graph_attention(layer.attn, x_in, edge_index, extra_mask=extra)[0]
    close(out, h + layer.ffn(layer.norm_ffn(h)))


def test_state_dict_round_trip():
    x, edge_index, edge_attr = make_inputs(EDGE_DIM)
    g = gk.Graph.from_edge_index(edge_index, N)
    source = gk.nn.GraphTransformerLayer(DIM, HEADS, norm="batch", edge_dim=EDGE_DIM).double()
    source(x, g, edge_attr)  # updates the batch-norm running statistics
    target = gk.nn.GraphTransformerLayer(DIM, HEADS, norm="batch", edge_dim=EDGE_DIM).double()
    target.load_state_dict(source.state_dict())
    source.eval(), target.eval()
    for a, b in zip(source(x, g, edge_attr), target(x, g, edge_attr)):
        assert torch.equal(a, b)


def test_compile_whole_layer_without_graph_break():
    x, edge_index, edge_attr = make_inputs(EDGE_DIM, dtype=torch.float32)
    g = gk.Graph.from_edge_index(edge_index, N)
    layer = gk.nn.GraphTransformerLayer(DIM, HEADS, edge_dim=EDGE_DIM)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, g, edge_attr), layer(x, g, edge_attr)):
        close(a, b, 1e-5)


def test_training_step_under_bf16_autocast():
    x, edge_index, edge_attr = make_inputs(EDGE_DIM, dtype=torch.float32)
    g = gk.Graph.from_edge_index(edge_index, N)
    layer = gk.nn.GraphTransformerLayer(DIM, HEADS, norm="batch", edge_dim=EDGE_DIM, dropout=0.1)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, e = layer(x, g, edge_attr)
        loss = h.float().square().mean() + e.float().square().mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    optimizer.step()


def grid_edges(rows, cols):
    node = torch.arange(rows * cols).view(rows, cols)
    right = torch.stack([node[:, :-1].flatten(), node[:, 1:].flatten()])
    down = torch.stack([node[:-1].flatten(), node[1:].flatten()])
    return torch.cat([right, down], 1)  # one direction only: the encodings symmetrise


def dense_normalized_adjacency(edge_index, n):
    a = torch.zeros(n, n, dtype=torch.float64)
    keep = edge_index[0] != edge_index[1]
    a[edge_index[0, keep], edge_index[1, keep]] = 1
    a = torch.maximum(a, a.T)
    degree = a.sum(1)
    inv_sqrt = torch.where(degree > 0, degree.rsqrt(), 0.0)
    return a, inv_sqrt[:, None] * a * inv_sqrt[None]


@pytest.mark.parametrize("dense_max_nodes", [None, 0])  # dense eigh, then lobpcg
def test_laplacian_pe_are_eigenvectors(dense_max_nodes):
    edge_index = torch.cat([grid_edges(6, 7), torch.tensor([[3], [3]])], 1)  # with a self-loop
    n, k = 42, 4
    pe, values = gk.nn.laplacian_pe(edge_index, k, return_eigenvalues=True,
                                    dense_max_nodes=dense_max_nodes, tol=1e-9)
    laplacian = torch.eye(n, dtype=torch.float64) - dense_normalized_adjacency(edge_index, n)[1]
    pe, values = pe.double(), values.double()
    assert pe.shape == (n, k)
    assert bool((values > 1e-6).all()) and bool((values.diff() >= -1e-6).all())
    close(laplacian @ pe, pe * values, 2e-4)
    close(values, torch.linalg.eigvalsh(laplacian)[1:k + 1], 1e-4)


def test_laplacian_pe_pads_small_graphs_and_sign_flip_keeps_columns():
    pe = gk.nn.laplacian_pe(torch.tensor([[0, 1], [1, 2]]), 5)
    assert pe.shape == (3, 5) and bool((pe[:, 2:] == 0).all()) and bool((pe[:, :2] != 0).any())
    flipped = gk.nn.random_sign_flip(pe)
    assert torch.equal(flipped.abs(), pe.abs())


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_encodings_on_device(device):
    edge_index = grid_edges(6, 7).to(device)
    pe, values = gk.nn.laplacian_pe(edge_index, 3, return_eigenvalues=True, dense_max_nodes=0)
    assert pe.device.type == device
    laplacian = torch.eye(42, dtype=torch.float64) - \
        dense_normalized_adjacency(edge_index.cpu(), 42)[1]
    pe, values = pe.cpu().double(), values.cpu().double()
    close(laplacian @ pe, pe * values, 2e-3)
    se = gk.nn.random_walk_se(edge_index, 5)
    assert se.device.type == device
    close(se.cpu(), gk.nn.random_walk_se(edge_index.cpu(), 5), 1e-5)


def test_random_walk_se_equals_dense_matrix_powers():
    n = 23  # the last node is isolated
    edge_index = torch.cat([grid_edges(4, 5), torch.tensor([[0, 7, 20], [19, 3, 21]])], 1)
    se = gk.nn.random_walk_se(edge_index, 7, num_nodes=n)
    a = dense_normalized_adjacency(edge_index, n)[0]
    degree = a.sum(1, keepdim=True)
    walk = torch.where(degree > 0, a / degree.clamp(min=1), 0.0)
    expected = torch.stack([torch.linalg.matrix_power(walk, t).diagonal() for t in range(1, 8)], 1)
    close(se.double(), expected, 1e-6)


def test_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="dim must be divisible by heads"):
        gk.nn.GraphAttention(10, 3)
    with pytest.raises(ValueError, match="norm"):
        gk.nn.GraphTransformerLayer(12, 3, norm="group")
    with pytest.raises(ValueError, match="dropout"):
        gk.nn.GraphTransformerLayer(12, 3, dropout=1.5)
    x, edge_index, edge_attr = make_inputs(EDGE_DIM)
    layer = gk.nn.GraphAttention(DIM, HEADS, edge_dim=EDGE_DIM).double()
    with pytest.raises(ValueError, match="x must be"):
        layer(x[:, :5], edge_index, edge_attr)
    with pytest.raises(ValueError, match="edge_attr .* is required"):
        layer(x, edge_index)
    with pytest.raises(ValueError, match="edge_attr must be"):
        layer(x, edge_index, edge_attr[:-1])
    with pytest.raises(TypeError, match="graph must be"):
        layer(x, [[0, 1], [1, 0]], edge_attr)
    with pytest.raises(ValueError, match="k must be"):
        gk.nn.random_walk_se(edge_index, 0)


@pytest.mark.parametrize("baseline", [[], ["--baseline", "segment-softmax"]])
def test_mesh_diffusion_example_runs(tmp_path, baseline):
    script = Path(__file__).resolve().parents[1] / "examples" / "mesh_diffusion.py"
    png = tmp_path / "mesh.png"
    result = subprocess.run([sys.executable, str(script), "--steps", "6", "--edge-features",
                             "--png", str(png)] + baseline, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert "rollout relative L2 error" in result.stdout and png.stat().st_size > 0


def test_layer_norm_keeps_autocast_precision():
    """Under bf16 autocast a bf16 input is normalised in bf16 (no fp32 copies): the result is
    float64 LayerNorm with the weight and bias rounded to bf16, to bf16 rounding, and so are
    the gradients; fp32 input and no autocast behave as nn.LayerNorm."""
    from gtkernels.nn.graph_transformer import AutocastLayerNorm

    norm, plain = AutocastLayerNorm(48), nn.LayerNorm(48)
    with torch.no_grad():
        for p in (norm.weight, norm.bias):
            p.normal_()
    plain.load_state_dict(norm.state_dict())
    x = (3 * torch.randn(37, 48) + 1).bfloat16().requires_grad_()
    grad = torch.randn(37, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    weight, bias = (p.detach().bfloat16().double() for p in (norm.weight, norm.bias))
    y64 = F.layer_norm(x64, (48,), weight, bias, norm.eps)
    close(y.double(), y64, 2 ** -7)
    got = torch.autograd.grad(y, [x, norm.weight, norm.bias], grad.bfloat16())
    want = torch.autograd.grad(y64, [x64], grad.double())[0]
    close(got[0].double(), want, 2 ** -6)
    assert got[1].dtype == got[2].dtype == torch.float32
    xf = torch.randn(5, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(norm(xf), plain(xf))
    assert torch.equal(norm(x), plain(x))
