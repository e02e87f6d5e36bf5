"""graph_attention through the dispatcher (C++ on CPU, Triton on CUDA) against the float64
references, gradients, registration checks, edge cases and bad inputs."""
import pytest
import torch

import gtkernels as gk
from gtkernels.reference import graph_attn as ref
from graph_cases import attention_inputs, random_edge_index
from utils import DEVICE_PARAMS, FLOAT_DTYPES, assert_within_tolerance, rel_err

SHAPES = [(1, 1, 1, 8), (17, 60, 3, 20), (40, 200, 4, 32), (9, 30, 2, 128)]  # N, E, H, D


def run_both(q, k, v, edge_index, g, edge_bias, edge_attr, **kw):
    ours = gk.graph_attention(q, k, v, g, edge_bias=edge_bias, edge_attr=edge_attr, **kw)
    same = ref.segment_softmax_attention(q, k, v, edge_index, edge_bias, edge_attr, **kw)
    as64 = [None if t is None else t.detach().double() for t in (q, k, v, edge_bias, edge_attr)]
    exact = ref.segment_softmax_attention(as64[0], as64[1], as64[2], edge_index, as64[3],
                                          as64[4], **kw)
    return ours, same, exact


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,e,h,d", SHAPES)
@pytest.mark.parametrize("bias,attr", [(False, False), (True, True)])
def test_forward_matches_reference(device, dtype, n, e, h, d, bias, attr):
    edge_index = random_edge_index(n, e, isolated=n // 5, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, edge_bias, edge_attr = attention_inputs(n, e, h, d, dtype=dtype, device=device,
                                                     bias=bias, attr=attr)
    ours, same, exact = run_both(q, k, v, edge_index, g, edge_bias, edge_attr)
    assert ours.dtype == dtype
    assert_within_tolerance(ours, exact, same)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bias,attr", [(False, False), (True, True)])
def test_backward_matches_reference(device, dtype, bias, attr):
    n, e, h, d = 23, 120, 3, 24
    edge_index = random_edge_index(n, e, isolated=4, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    inputs = attention_inputs(n, e, h, d, dtype=dtype, device=device, bias=bias, attr=attr)
    grad_out = torch.randn(n, h, d, device=device, dtype=dtype)

    def grads(attention, as_dtype):
        leaves = [t.to(as_dtype).requires_grad_(True) for t in inputs if t is not None]
        out = attention(*leaves)
        return torch.autograd.grad(out, leaves, grad_out.to(as_dtype))

    def kwargs(leaves):
        extra = iter(leaves[3:])
        return dict(edge_bias=next(extra) if bias else None, edge_attr=next(extra) if attr else None)

    ours = grads(lambda *t: gk.graph_attention(*t[:3], g, **kwargs(t)), dtype)
    same = grads(lambda *t: ref.segment_softmax_attention(*t[:3], edge_index, **kwargs(t)), dtype)
    exact = grads(lambda *t: ref.segment_softmax_attention(*t[:3], edge_index, **kwargs(t)),
                  torch.float64)
    for got, torch_same, want in zip(ours, same, exact):
        assert_within_tolerance(got, want, torch_same, floor=1e-5)


def test_dense_masked_reference_agrees():
    """The kernel, and the per-edge reference, equal dense attention masked by edge counts."""
    n, e, h, d = 15, 70, 2, 16
    edge_index = random_edge_index(n, e, isolated=3)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, _, _ = attention_inputs(n, e, h, d, dtype=torch.float64)
    dense = ref.dense_masked_attention(q, k, v, edge_index)
    assert rel_err(gk.graph_attention(q, k, v, g), dense) < 1e-12
    assert rel_err(ref.segment_softmax_attention(q, k, v, edge_index), dense) < 1e-12


@pytest.mark.parametrize("bias,attr", [(False, False), (True, False), (True, True)])
def test_gradcheck(bias, attr):
    n, e, h, d = 7, 20, 2, 3
    edge_index = random_edge_index(n, e, isolated=1)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    inputs = attention_inputs(n, e, h, d, dtype=torch.float64, bias=bias, attr=attr,
                              requires_grad=True)

    def f(q, k, v, edge_bias, edge_attr):
        out, lse = gk.graph_attention(q, k, v, g, edge_bias=edge_bias, edge_attr=edge_attr,
                                      return_lse=True)
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    assert torch.autograd.gradcheck(f, inputs)


def test_lse_matches_reference_and_is_minus_inf_on_empty_rows():
    n, e, h, d = 12, 40, 2, 8
    edge_index = random_edge_index(n, e, isolated=3)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, edge_bias, edge_attr = attention_inputs(n, e, h, d, bias=True, attr=True)
    out, lse = gk.graph_attention(q, k, v, g, edge_bias=edge_bias, edge_attr=edge_attr,
                                  scale=0.3, return_lse=True)
    ref_out, ref_lse = ref.segment_softmax_attention(q.double(), k.double(), v.double(),
                                                     edge_index, edge_bias.double(),
                                                     edge_attr.double(), 0.3, True)
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert bool((lse[-3:] == float("-inf")).all())
    finite = torch.isfinite(ref_lse)
    assert rel_err(lse[finite], ref_lse[finite]) < 1e-6
    assert rel_err(out, ref_out) < 1e-5


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_isolated_nodes_get_zeros_and_zero_grads(device):
    n, e, h, d = 10, 30, 2, 8
    edge_index = random_edge_index(n, e, isolated=4, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, _, _ = attention_inputs(n, e, h, d, device=device, requires_grad=True)
    out = gk.graph_attention(q, k, v, g)
    (dq,) = torch.autograd.grad(out, [q], torch.randn_like(out))
    assert bool((out[-4:] == 0).all()) and bool((dq[-4:] == 0).all())
    unused = torch.ones(n, dtype=torch.bool, device=device)
    unused[edge_index[0]] = False  # nodes that are nobody's key get zero dk, dv
    dk, dv = torch.autograd.grad(gk.graph_attention(q, k, v, g).sum(), [k, v])
    assert bool((dk[unused] == 0).all()) and bool((dv[unused] == 0).all())


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("n", [0, 6])
def test_no_edges(device, n):
    g = gk.Graph.from_edge_index(torch.zeros(2, 0, dtype=torch.int64, device=device), n)
    q, k, v, edge_bias, edge_attr = attention_inputs(n, 0, 2, 8, device=device, bias=True,
                                                     attr=True, requires_grad=True)
    out, lse = gk.graph_attention(q, k, v, g, edge_bias=edge_bias, edge_attr=edge_attr,
                                  return_lse=True)
    assert out.shape == (n, 2, 8) and bool((out == 0).all())
    assert lse.shape == (n, 2) and bool((lse == float("-inf")).all())
    grads = torch.autograd.grad(out.sum(), [q, k, v, edge_bias, edge_attr])
    assert all(bool((gr == 0).all()) for gr in grads)
    assert grads[3].shape == (0, 2) and grads[4].shape == (0, 2, 8)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_minus_inf_bias_masks_edges(device):
    """An edge with bias -inf drops out; a node whose edges all have -inf gets zeros."""
    n, e, h, d = 10, 40, 2, 8
    edge_index = random_edge_index(n, e, device=device)
    edge_index[1, :4] = 0
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, edge_bias, _ = attention_inputs(n, e, h, d, device=device, bias=True,
                                             requires_grad=True)
    masked = (torch.rand(e, device=device) < 0.3) | (edge_index[1] == 0)
    bias = torch.where(masked[:, None], float("-inf"), edge_bias)
    out = gk.graph_attention(q, k, v, g, edge_bias=bias)
    kept = edge_index[:, ~masked]
    expected = ref.segment_softmax_attention(q, k, v, kept, edge_bias[~masked])
    torch.testing.assert_close(out, expected)
    assert bool((out[0] == 0).all())
    grads = torch.autograd.grad(out, [q, k, v], torch.ones_like(out))
    expected_grads = torch.autograd.grad(expected, [q, k, v], torch.ones_like(out))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b)


def test_duplicate_edges_count_separately():
    q, k, v, _, _ = attention_inputs(3, 0, 1, 8, dtype=torch.float64)
    once = gk.Graph.from_edge_index(torch.tensor([[1, 2], [0, 0]]), num_nodes=3)
    twice = gk.Graph.from_edge_index(torch.tensor([[1, 2, 1], [0, 0, 0]]), num_nodes=3)
    w = torch.softmax(torch.stack([q[0] @ k[1].T, q[0] @ k[2].T, q[0] @ k[1].T]).flatten()
                      / 8 ** 0.5, 0)
    expected = w[0] * v[1] + w[1] * v[2] + w[2] * v[1]
    assert rel_err(gk.graph_attention(q, k, v, twice)[0], expected) < 1e-12
    assert rel_err(gk.graph_attention(q, k, v, once)[0], expected) > 1e-3


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_non_contiguous_inputs(device):
    n, e, h, d = 14, 50, 3, 16
    edge_index = random_edge_index(n, e, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    base = torch.randn(n, d, h, 3, device=device)
    q, k, v = (base[..., t].transpose(1, 2) for t in range(3))  # [N, H, D], strided
    assert not q.is_contiguous()
    expected = gk.graph_attention(q.contiguous(), k.contiguous(), v.contiguous(), g)
    assert torch.equal(gk.graph_attention(q, k, v, g), expected)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_backward_is_deterministic(device):
    n, e, h, d = 50, 400, 2, 16
    hub = 1200  # longer than the Triton chunk: split rows and their combines are covered too
    edge_index = random_edge_index(n, e, hub_edges=hub, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    inputs = attention_inputs(n, e + hub, h, d, device=device, bias=True, attr=True,
                              requires_grad=True)

    def grads():
        out = gk.graph_attention(*inputs[:3], g, edge_bias=inputs[3], edge_attr=inputs[4])
        return torch.autograd.grad(out, inputs, torch.ones_like(out))

    was_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # every op on the path must allow it
    try:
        for a, b in zip(grads(), grads()):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(was_deterministic)


def op_args(n, e, h, d, device, dtype=torch.float32):
    edge_index = random_edge_index(n, e, isolated=2, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, edge_bias, edge_attr = attention_inputs(n, e, h, d, dtype=dtype, device=device,
                                                     bias=True, attr=True)
    graph = (g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids)
    return g, graph, q, k, v, edge_bias[g.edge_perm], edge_attr[g.edge_perm]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("features", [False, True])
def test_opcheck(device, features):
    g, graph, q, k, v, edge_bias, edge_attr = op_args(11, 40, 2, 8, device)
    if not features:
        edge_bias = edge_attr = None
    for t in (q, k, v, edge_bias, edge_attr):
        if t is not None:
            t.requires_grad_(True)
    args = (*graph, q, k, v, edge_bias, edge_attr, 0.4)
    torch.library.opcheck(torch.ops.gtkernels.graph_attention.default, args)
    out, lse = torch.ops.gtkernels.graph_attention(*args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                v.detach(), out.detach(), lse.detach(), g.indptr, g.indices, g.csc_indptr,
                g.csc_indices, g.csc_edge_ids,
                None if edge_bias is None else edge_bias.detach(),
                None if edge_attr is None else edge_attr.detach(), 0.4)
    torch.library.opcheck(torch.ops.gtkernels.graph_attention_backward.default, bwd_args)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_compiles_without_graph_break(device):
    n, e, h, d = 12, 50, 2, 8
    edge_index = random_edge_index(n, e, isolated=2, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, edge_bias, edge_attr = attention_inputs(n, e, h, d, device=device, bias=True,
                                                     attr=True, requires_grad=True)

    def f(q, k, v, edge_bias, edge_attr):
        out = gk.graph_attention(q * 2.0, k, v, g, edge_bias=edge_bias, edge_attr=edge_attr)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [q, k, v, edge_bias, edge_attr]
    expected = torch.autograd.grad(f(*leaves), leaves)
    got = torch.autograd.grad(compiled(*leaves), leaves)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_int64_indices(device):
    """Graphs past 2**31 nodes or edges keep int64 indices; the kernels take both."""
    n, e, h, d = 16, 60, 2, 8
    g = gk.Graph.from_edge_index(random_edge_index(n, e, hub_edges=40, device=device), n)
    wide = gk.Graph(n, g.indptr, g.indices.long(), g.edge_perm, g.csc_indptr,
                    g.csc_indices.long(), g.csc_edge_ids.long())
    inputs = attention_inputs(n, e + 40, h, d, device=device, bias=True, attr=True,
                              requires_grad=True)

    def fwd_bwd(graph):
        out = gk.graph_attention(*inputs[:3], graph, edge_bias=inputs[3], edge_attr=inputs[4])
        return [out, *torch.autograd.grad(out, inputs, torch.ones_like(out))]

    for a, b in zip(fwd_bwd(wide), fwd_bwd(g)):
        assert torch.equal(a, b)


def bad_call(n=6, e=10, h=2, d=8, **changes):
    g = gk.Graph.from_edge_index(random_edge_index(n, e), num_nodes=n)
    args = dict(zip("qkv", attention_inputs(n, e, h, d)[:3]))
    args.update(changes)
    return lambda: gk.graph_attention(args.pop("q"), args.pop("k"), args.pop("v"),
                                      args.pop("g", g), **args)


@pytest.mark.parametrize("call,match", [
    (bad_call(edge_bias=torch.randn(10, 3)), r"edge_bias must be \[E, H\] = \[10, 2\], got \[10, 3\]"),
    (bad_call(edge_attr=torch.randn(10, 2, 4)),
     r"edge_attr must be \[E, H, D\] = \[10, 2, 8\], got \[10, 2, 4\]"),
    (bad_call(k=torch.randn(6, 2, 4)), r"k must be \[N, H, D\] = \[6, 2, 8\]"),
    (bad_call(q=torch.randn(5, 2, 8), k=torch.randn(5, 2, 8), v=torch.randn(5, 2, 8)),
     "N = g.num_nodes = 6"),
    (bad_call(v=torch.randn(6, 2, 8, dtype=torch.float64)), "v has dtype"),
    (bad_call(q=torch.arange(96).reshape(6, 2, 8)), "q must have dtype"),
    (bad_call(q=torch.randn(6, 16)), "q must have 3 dims"),
    (bad_call(g="graph"), "g must be a gtkernels.Graph"),
    (bad_call(q=torch.randn(6, 2, 0), k=torch.randn(6, 2, 0), v=torch.randn(6, 2, 0)),
     r"head dim D must be in \[1, 256\]"),
    (bad_call(edge_bias=torch.randn(10, 2, device="meta")), "edge_bias is on meta"),
])
def test_bad_inputs(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_matches_pyg_transformer_conv(device):
    """TransformerConv (identity projections, no root weight) computes the same attention."""
    tg = pytest.importorskip("torch_geometric")
    n, e, h, d = 30, 150, 3, 16
    edge_index = random_edge_index(n, e, isolated=5, device=device)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    q, k, v, _, edge_attr = attention_inputs(n, e, h, d, device=device, attr=True)
    conv = tg.nn.TransformerConv((2 * h * d, h * d), d, heads=h, edge_dim=h * d,
                                 root_weight=False).to(device)
    eye = torch.eye(h * d, device=device)
    with torch.no_grad():
        conv.lin_query.weight.copy_(eye)
        conv.lin_key.weight.copy_(torch.cat([eye, torch.zeros_like(eye)], 1))
        conv.lin_value.weight.copy_(torch.cat([torch.zeros_like(eye), eye], 1))
        conv.lin_edge.weight.copy_(eye)
        for lin in (conv.lin_query, conv.lin_key, conv.lin_value):
            lin.bias.zero_()
        x_src = torch.cat([k.reshape(n, -1), v.reshape(n, -1)], 1)
        expected = conv((x_src, q.reshape(n, -1)), edge_index,
                        edge_attr.reshape(e, -1)).reshape(n, h, d)
    ours = gk.graph_attention(q, k, v, g, edge_attr=edge_attr)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_cuda_matches_cpu_on_a_hub_graph(dtype):
    """Rows far longer than the Triton chunk (split + combined) on the real GPU."""
    n, e, hub = 3000, 20000, 5000
    edge_index = random_edge_index(n, e, hub_edges=hub, isolated=300)
    edge_index[0, :hub // 2] = 7  # a hub source too: its CSC column is split in the backward
    g = gk.Graph.from_edge_index(edge_index, num_nodes=n)
    inputs = attention_inputs(n, e + hub, 4, 32, dtype=dtype, bias=True, attr=True,
                              requires_grad=True)
    grad_out = torch.randn(n, 4, 32, dtype=dtype)

    def fwd_bwd(attention, device, as_dtype=dtype):
        leaves = [t.detach().to(device, as_dtype).requires_grad_(True) for t in inputs]
        out = attention(leaves)
        return [out] + list(torch.autograd.grad(out, leaves, grad_out.to(device, out.dtype)))

    ours = fwd_bwd(lambda t: gk.graph_attention(*t[:3], g.to("cuda"), edge_bias=t[3],
                                                edge_attr=t[4]), "cuda")
    same = fwd_bwd(lambda t: ref.segment_softmax_attention(*t[:3], edge_index.cuda(), *t[3:]),
                   "cuda")
    exact = fwd_bwd(lambda t: ref.segment_softmax_attention(*t[:3], edge_index, *t[3:]), "cpu",
                    torch.float64)
    for got, torch_same, want in zip(ours, same, exact):
        assert_within_tolerance(got.cpu(), want, torch_same.cpu(), floor=1e-5)
