"""The Triton graph-attention kernels through the interpreter (TRITON_INTERPRET=1) at small
sizes, called through their launchers on CPU tensors; a small `chunk` makes the hub rows and
columns split into several segments and go through the combine kernels."""
import pytest
import torch

import gtkernels as gk
from gtkernels.reference import graph_attn as ref
from gtkernels.triton import HAS_TRITON, interpreting
from graph_cases import attention_inputs, random_edge_index
from utils import assert_within_tolerance

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (interpreting() or torch.cuda.is_available()),
    reason="needs triton with a GPU or TRITON_INTERPRET=1")


def _device():
    return "cpu" if interpreting() else "cuda"


def launch(g, inputs, grad_out, scale, chunk, grad_lse=None):
    """Forward and backward launchers on per-edge tensors in construction order; also returns
    the delta [N, H] the backward stores (into a poisoned buffer)."""
    from gtkernels.triton.graph_attn import LaunchConfig, graph_attention_forward
    from gtkernels.triton.graph_attn_bwd import graph_attention_backward

    q, k, v, edge_bias, edge_attr = inputs
    perm = g.edge_perm
    bias = None if edge_bias is None else edge_bias[perm]
    attr = None if edge_attr is None else edge_attr[perm]
    graph = (g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids)
    config = LaunchConfig(chunk=chunk)
    out, lse = graph_attention_forward(*graph, q, k, v, bias, attr, scale, config)
    delta = torch.full_like(lse, float("nan"))
    dq, dk, dv, d_bias, d_attr = graph_attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, *graph, bias, attr, scale, config, delta)
    inverse = torch.argsort(perm)
    d_bias = None if edge_bias is None else d_bias[inverse]
    d_attr = None if edge_attr is None else d_attr[inverse]
    return out, lse, [dq, dk, dv, d_bias, d_attr], delta


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,d", [(3, 20), (1, 8), (2, 64)])
@pytest.mark.parametrize("features", [False, True])
def test_triton_kernels_match_reference(dtype, h, d, features):
    n, e, hub = 12, 40, 30  # node 0: ~33 in-edges = 9 segments of 4; 3 isolated nodes
    device = _device()
    edge_index = random_edge_index(n, e, hub_edges=hub, isolated=3, device=device)
    edge_index[0, :hub] = 5  # node 5 is a hub source too: its CSC column gets split
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    inputs = attention_inputs(n, e + hub, h, d, dtype=dtype, device=device, bias=features,
                              attr=features)
    grad_out = torch.randn(n, h, d, device=device, dtype=dtype)
    grad_lse = torch.randn(n, h, device=device) if features else None  # gradient through lse
    scale = 0.7 * d ** -0.5
    out, lse, grads, delta = launch(g, inputs, grad_out, scale, chunk=4, grad_lse=grad_lse)
    want_delta = (grad_out.float() * out.float()).sum(-1)
    if grad_lse is not None:
        want_delta -= grad_lse
    torch.testing.assert_close(delta, want_delta, atol=1e-5, rtol=1e-5)

    def reference(as_dtype):
        leaves = [None if t is None else t.to(as_dtype).requires_grad_(True) for t in inputs]
        o, l = ref.segment_softmax_attention(*leaves[:3], edge_index, *leaves[3:], scale=scale,
                                             return_lse=True)
        used = [t for t in leaves if t is not None]
        outputs, grads = [o], [grad_out.to(as_dtype)]
        if grad_lse is not None:
            outputs.append(torch.where(torch.isinf(l), 0.0, l))
            grads.append(grad_lse.to(l.dtype))
        return o, l, list(torch.autograd.grad(outputs, used, grads))

    same_out, _, same_grads = reference(dtype)
    exact_out, exact_lse, exact_grads = reference(torch.float64)
    assert_within_tolerance(out, exact_out, same_out)
    finite = torch.isfinite(exact_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert torch.allclose(lse[finite].double(), exact_lse[finite], rtol=1e-3, atol=1e-3)
    for got, torch_same, want in zip([t for t in grads if t is not None], same_grads,
                                     exact_grads):
        assert_within_tolerance(got, want, torch_same, floor=1e-5)


def test_triton_empty_rows_and_no_edges():
    device = _device()
    from gtkernels.triton.graph_attn import LaunchConfig, graph_attention_forward

    g = gk.Graph.from_edge_index(torch.zeros(2, 0, dtype=torch.int64, device=device), 5)
    q = torch.randn(5, 2, 8, device=device)
    graph = (g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids)
    out, lse = graph_attention_forward(*graph, q, q, q, None, None, 0.5, LaunchConfig(chunk=4))
    assert bool((out == 0).all()) and bool((lse == float("-inf")).all())


def test_triton_backward_is_deterministic():
    device = _device()
    n, e, hub = 10, 30, 25
    edge_index = random_edge_index(n, e, hub_edges=hub, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    inputs = attention_inputs(n, e + hub, 2, 16, device=device, bias=True, attr=True)
    grad_out = torch.randn(n, 2, 16, device=device)
    first = launch(g, inputs, grad_out, 0.25, chunk=4)[2]
    again = launch(g, inputs, grad_out.clone(), 0.25, chunk=4)[2]
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("h,d", [(3, 20), (2, 64), (1, 1)])
def test_triton_kernels_read_qkv_views_in_place(h, d):
    """q, k, v sliced from one [N, 3, H, D] projection (row stride 3 H D, as GraphAttention
    makes them) give bitwise the results of contiguous copies; other layouts are copied."""
    from gtkernels.triton.graph_attn import node_rows

    n, e = 12, 50
    device = _device()
    g = gk.Graph.from_edge_index(random_edge_index(n, e, hub_edges=20, device=device),
                                 num_nodes=n)
    qkv = torch.randn(n, 3, h, d, device=device, dtype=torch.bfloat16)
    views = list(qkv.unbind(1))
    _, _, _, stride_q, stride_kv = node_rows(*views)
    assert stride_q == stride_kv == 3 * h * d
    grad_out = torch.randn(n, h, d, device=device, dtype=torch.bfloat16)
    strided = launch(g, views + [None, None], grad_out, d ** -0.5, chunk=4)
    packed = launch(g, [t.contiguous() for t in views] + [None, None], grad_out, d ** -0.5,
                    chunk=4)
    for got, want in zip([*strided[:2], *strided[2][:3]], [*packed[:2], *packed[2][:3]]):
        assert got.is_contiguous() and torch.equal(got, want)
    # k and v with different row strides, and a transposed q, are copied first
    k_other = torch.randn(n, 2 * h, d, device=device)[:, :h]
    q_t = torch.randn(n, d, h, device=device).transpose(1, 2)
    q, k, v, stride_q, stride_kv = node_rows(q_t, k_other, views[2])
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    assert (stride_q, stride_kv) == (h * d, h * d)
