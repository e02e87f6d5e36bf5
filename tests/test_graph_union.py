"""graph_attention with window / global_nodes (the adjacency + window + global union) against
the float64 dense-mask reference: forward, lse, gradients, edge cases, registration checks and
bad inputs. The Triton kernels of the union's parts: tests/test_graph_union_triton.py."""
import pytest
import torch

import gtkernels as gk
from gtkernels.reference import graph_attn as ref
from graph_cases import attention_inputs, random_edge_index
from utils import (DEVICE_PARAMS, FLOAT_DTYPES, assert_bitwise_repeatable,
                   assert_within_tolerance)

# N, E, window, dilation, global nodes (None: no global_nodes argument)
CASES = {
    "mixed": (37, 150, 3, 2, [0, 5, 36]),
    "window-only": (30, 90, 4, 3, None),
    "globals-only": (25, 80, 0, 1, [1, 7, 24]),
    "dilation-past-n": (9, 20, 2, 20, [4]),
    "window-past-n": (10, 30, 15, 1, [3]),
    "all-global": (8, 20, 1, 1, list(range(8))),
    "no-globals-given-empty": (12, 30, 2, 1, []),
}


def union_graph(n, e, device, isolated=0):
    """A coalesced Graph and its edge_index (edges in the Graph's CSR = construction order)."""
    g = gk.Graph.from_edge_index(random_edge_index(n, e, isolated=isolated, device=device),
                                 num_nodes=n).coalesce()
    return g, g.edge_index()


def globals_tensor(nodes, device):
    return None if nodes is None else torch.tensor(nodes, dtype=torch.int64, device=device)


def differentiable_case(n, e, h, d, nodes, device, dtype=torch.float32):
    """(graph, [q, k, v, edge_bias, edge_attr] requiring grad, global nodes) of a random union."""
    g, _ = union_graph(n, e, device)
    inputs = attention_inputs(n, g.num_edges, h, d, dtype=dtype, device=device, bias=True,
                              attr=True, requires_grad=True)
    return g, inputs, globals_tensor(nodes, device)


def run_union(attention, leaves, edge_index_or_graph, bias, attr, window, dilation, glob):
    q, k, v, *extra = leaves
    extra = iter(extra)
    return attention(q, k, v, edge_index_or_graph, edge_bias=next(extra) if bias else None,
                     edge_attr=next(extra) if attr else None, window=window, dilation=dilation,
                     global_nodes=glob)


def ours(q, k, v, g, **kw):
    return gk.graph_attention(q, k, v, g, return_lse=True, **kw)


def forward_and_grads(attention, graph, inputs, dtype, grad_out, *config):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in inputs if t is not None]
    out, lse = run_union(attention, leaves, graph, *config)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return out, lse, grads


def check_against_reference(device, dtype, n, e, window, dilation, nodes, bias, attr,
                            isolated=0):
    g, edge_index = union_graph(n, e, device, isolated)
    glob = globals_tensor(nodes, device)
    h, d = 2, 16
    inputs = attention_inputs(n, g.num_edges, h, d, device=device, bias=bias, attr=attr)
    grad_out = torch.randn(n, h, d, device=device)
    config = (bias, attr, window, dilation, glob)
    got = forward_and_grads(ours, g, inputs, dtype, grad_out, *config)
    same = forward_and_grads(ref.dense_union_attention, edge_index, inputs, dtype, grad_out,
                             *config)
    exact = forward_and_grads(ref.dense_union_attention, edge_index, inputs, torch.float64,
                              grad_out, *config)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_within_tolerance(got[0], exact[0], same[0])
    finite = torch.isfinite(exact[1])
    assert torch.equal(torch.isfinite(got[1]), finite)
    assert_within_tolerance(got[1][finite], exact[1][finite], same[1][finite], name="lse")
    for name, a, b, c in zip("q k v bias attr".split(), got[2], same[2], exact[2]):
        assert_within_tolerance(a, c, b, floor=1e-5, name=f"d{name}")


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias,attr", [(False, False), (True, True)])
def test_union_matches_dense_reference(device, case, bias, attr):
    check_against_reference(device, torch.float32, *CASES[case], bias, attr)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES[1:])
def test_union_low_precision(device, dtype):
    check_against_reference(device, dtype, *CASES["mixed"], True, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_union_at_band_scale(dtype):
    """Several band tiles per residue class and the Triton global passes with many splits:
    N = 3000, window 32, dilation 2, 8 global nodes (mesh-union's options)."""
    check_against_reference("cuda", dtype, 3000, 20000, 32, 2,
                            torch.linspace(0, 2999, 8).long().tolist(), True, True)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_isolated_nodes_without_keys_get_zeros_and_zero_grads(device):
    n, h, d = 14, 2, 8
    g, _ = union_graph(n, 30, device, isolated=4)
    q, k, v, _, _ = attention_inputs(n, g.num_edges, h, d, device=device, requires_grad=True)
    out, lse = gk.graph_attention(q, k, v, g, global_nodes=globals_tensor([], device),
                                  return_lse=True)
    lonely = g.indptr.diff() == 0
    assert bool(lonely.any())
    assert torch.equal(out[lonely], torch.zeros_like(out[lonely]))
    assert bool(torch.isneginf(lse[lonely]).all())
    torch.testing.assert_close(out, gk.graph_attention(q, k, v, g))
    (dq,) = torch.autograd.grad((out * out).sum() + lse[~lonely].sum(), [q])
    assert torch.equal(dq[lonely], torch.zeros_like(dq[lonely]))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("n", [0, 6])
def test_empty_graphs(device, n):
    edge_index = torch.zeros(2, 0, dtype=torch.int64, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    glob = globals_tensor([0] if n else [], device)
    q, k, v, _, _ = attention_inputs(n, 0, 2, 8, device=device, requires_grad=True)
    out, lse = gk.graph_attention(q, k, v, g, window=2, dilation=2, global_nodes=glob,
                                  return_lse=True)
    want, want_lse = ref.dense_union_attention(q.double(), k.double(), v.double(), edge_index,
                                               window=2, dilation=2, global_nodes=glob)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    assert all(gr.shape == q.shape for gr in grads)


@pytest.mark.parametrize("window,dilation,nodes", [(2, 2, [0, 4]), (0, 1, [3]), (3, 1, None)])
def test_gradcheck(window, dilation, nodes):
    n = 9
    g, inputs, glob = differentiable_case(n, 25, 2, 4, nodes, "cpu", dtype=torch.float64)

    def f(q, k, v, bias, attr):
        return gk.graph_attention(q, k, v, g, edge_bias=bias, edge_attr=attr, window=window,
                                  dilation=dilation, global_nodes=glob, return_lse=True)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_backward_is_bitwise_repeatable(device):
    n = 40
    g, inputs, glob = differentiable_case(n, 200, 2, 16, [0, 17, 39], device)

    def grads():
        out = gk.graph_attention(*inputs[:3], g, edge_bias=inputs[3], edge_attr=inputs[4],
                                 window=3, dilation=2, global_nodes=glob)
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # every op on the path must allow it
    try:
        assert_bitwise_repeatable(grads, runs=3)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_compiles_without_graph_break(device):
    n = 15
    g, inputs, glob = differentiable_case(n, 50, 2, 8, [2, 9], device)

    def f(q, k, v, edge_bias, edge_attr):
        out = gk.graph_attention(q * 2.0, k, v, g, edge_bias=edge_bias, edge_attr=edge_attr,
                                 window=2, dilation=3, global_nodes=glob)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    expected = torch.autograd.grad(f(*inputs), inputs)
    for a, b in zip(torch.autograd.grad(compiled(*inputs), inputs), expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_window_op_with_exclusion_passes_opcheck(device):
    n, window = 13, 2
    q, k, v = (torch.randn(1, n, 2, 8, device=device, requires_grad=True) for _ in range(3))
    exclude = torch.rand(n, 2 * window + 1, device=device) < 0.4
    exclude[3] = True  # a query without keys
    args = (q, k, v, window, 3, 0, False, 0.3, exclude)
    torch.library.opcheck(torch.ops.gtkernels.window_attention.default, args)
    out, lse = torch.ops.gtkernels.window_attention(*args)
    assert torch.equal(out[0, 3], torch.zeros_like(out[0, 3])) and bool(lse[0, 3].isneginf().all())
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                v.detach(), out.detach(), lse.detach(), window, 3, 0, False, 0.3, exclude)
    torch.library.opcheck(torch.ops.gtkernels.window_attention_backward.default, bwd_args)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("window,nodes", [(2, [1, 8]), (0, [3]), (1, None)])
def test_union_ops_pass_opcheck(device, window, nodes):
    n = 11
    g, _ = union_graph(n, 30, device)
    q, k, v, bias, attr = attention_inputs(n, g.num_edges, 2, 8, device=device, bias=True,
                                           attr=True, requires_grad=True)
    graph = (g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids)
    options = (0.3, window, 2, globals_tensor(nodes, device))
    args = (*graph, q, k, v, bias, attr, *options)
    torch.library.opcheck(torch.ops.gtkernels.graph_attention_union.default, args)
    out, lse = (t.detach() for t in torch.ops.gtkernels.graph_attention_union(*args))
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                v.detach(), out, lse, *graph, bias.detach(), attr.detach(), *options)
    torch.library.opcheck(torch.ops.gtkernels.graph_attention_union_backward.default, bwd_args)


def bad_union_call(g=None, **changes):
    n = 6
    g = g or gk.Graph.from_edge_index(torch.tensor([[0, 1, 2], [1, 2, 3]]), num_nodes=n)
    q = torch.randn(n, 2, 8)
    return lambda: gk.graph_attention(q, q, q, g, **changes)


DUPLICATED = gk.Graph.from_edge_index(torch.tensor([[0, 0, 2], [1, 1, 3]]), num_nodes=6)


@pytest.mark.parametrize("call,error,match", [
    (bad_union_call(global_nodes=torch.tensor([0, 6])), IndexError, "global_nodes holds 6"),
    (bad_union_call(global_nodes=torch.tensor([-1])), IndexError, "global_nodes holds -1"),
    (bad_union_call(global_nodes=torch.tensor([1.0])), TypeError, "global_nodes must have dtype"),
    (bad_union_call(global_nodes=torch.tensor([[1]])), ValueError, "global_nodes must have 1"),
    (bad_union_call(global_nodes=torch.tensor([2, 2])), ValueError, "must be distinct"),
    (bad_union_call(window=-1), ValueError, r"window must be in \[0"),
    (bad_union_call(window=2, dilation=0), ValueError, r"dilation must be in \[1"),
    (bad_union_call(window=1.5), TypeError, "window must be an int"),
    (bad_union_call(DUPLICATED, window=1), ValueError, r"g has duplicate edges.*coalesce"),
    (bad_union_call(DUPLICATED, global_nodes=torch.tensor([0])), ValueError, "g has duplicate"),
])
def test_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_coalesced_graph_is_accepted_after_coalesce():
    q = torch.randn(6, 2, 8)
    assert not DUPLICATED.is_coalesced() and DUPLICATED.coalesce().is_coalesced()
    gk.graph_attention(q, q, q, DUPLICATED.coalesce(), window=1)
