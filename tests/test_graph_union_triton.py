"""The Triton kernels of graph_attention's union through the interpreter: the band kernels of
window_attention with an exclusion mask against the CPU op with the same mask, and the list
kernels of the global parts against the CPU union op."""

import pytest
import torch

from gtkernels.triton import HAS_TRITON, interpreting

pytestmark = pytest.mark.skipif(not HAS_TRITON or not interpreting(),
                                reason="needs triton with TRITON_INTERPRET=1")

# N, H, D, window, dilation: small (the interpreter is slow)
CASES = [(37, 2, 16, 3, 2), (80, 1, 16, 40, 1), (20, 1, 8, 2, 30), (33, 1, 24, 5, 3)]


def exclusion_mask(n, window):
    exclude = torch.rand(n, 2 * window + 1) < 0.3
    exclude[n // 2] = True  # a query without keys
    return exclude


@pytest.mark.parametrize("n,h,d,window,dilation", CASES)
def test_triton_band_with_exclusion_matches_cpu_op(n, h, d, window, dilation):
    from gtkernels.triton.window_attn import window_attention_forward
    from gtkernels.triton.window_attn_backward import window_attention_backward

    q, k, v = torch.randn(3, 1, n, h, d).unbind(0)
    grad_out, grad_lse = torch.randn(1, n, h, d), torch.randn(1, n, h)
    exclude = exclusion_mask(n, window)
    options = (window, dilation, 0, False, d ** -0.5, exclude)
    want = torch.ops.gtkernels.window_attention(q, k, v, *options)
    want_grads = torch.ops.gtkernels.window_attention_backward(grad_out, grad_lse, q, k, v,
                                                               *want, *options)
    out, lse = window_attention_forward(q, k, v, *options)
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-4)
    grads = window_attention_backward(grad_out, grad_lse, q, k, v, out, lse, *options)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


# N, E, window, dilation, global nodes
UNION_CASES = [(37, 120, 3, 2, [0, 5, 36]), (20, 60, 0, 1, list(range(0, 20, 2))),
               (25, 70, 2, 1, []), (18, 40, 1, 3, [17] + list(range(16))),
               (70, 200, 20, 1, [2, 69])]


@pytest.mark.parametrize("n,e,window,dilation,nodes", UNION_CASES)
def test_triton_global_parts_match_cpu_op(n, e, window, dilation, nodes):
    """The Triton band kernels in union mode and the list kernels (global keys, global rows,
    gradient sums) given the CPU edge part's forward (the backward runs the Triton edge
    kernels, which compute delta for all parts), against the CPU union op."""
    check_union_against_cpu_op(n, e, window, dilation, nodes)


def test_triton_global_rows_over_several_chunks(monkeypatch):
    """The global rows' partials over several chunks, folded by union_partials' kernels in
    several tiles of chunks (with a ragged last tile)."""
    from gtkernels.triton import union_partials, window_common

    monkeypatch.setattr(window_common, "MIN_TILES_PER_SPLIT", 1)
    monkeypatch.setattr(union_partials, "TILE_ELEMENTS", 32)
    check_union_against_cpu_op(70, 200, 20, 1, [2, 69, 40])


def check_union_against_cpu_op(n, e, window, dilation, nodes):
    import gtkernels as gk
    from gtkernels.graph_union import cached_union_masks
    from gtkernels.triton.graph_union import union_backward, union_forward
    from graph_cases import attention_inputs, random_edge_index

    g = gk.Graph.from_edge_index(random_edge_index(n, e), num_nodes=n).coalesce()
    q, k, v, bias, attr = attention_inputs(n, g.num_edges, 2, 16, bias=True, attr=True)
    glob = torch.tensor(nodes, dtype=torch.int64)
    masks = cached_union_masks(g.indptr, g.indices, window, dilation, glob)
    graph = (g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids)
    scale = 0.25
    options = (scale, window, dilation, glob)
    want = torch.ops.gtkernels.graph_attention_union(*graph, q, k, v, bias, attr, *options)
    grad_out, grad_lse = torch.randn_like(q), torch.randn(n, 2)
    want_grads = torch.ops.gtkernels.graph_attention_union_backward(
        grad_out, grad_lse, q, k, v, *want, *graph, bias, attr, *options)

    edge_part = torch.ops.gtkernels.graph_attention(*graph, q, k, v, bias, attr, scale)
    out, lse = union_forward(q, k, v, masks, edge_part, window, dilation, scale)
    torch.testing.assert_close(out, want[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want[1], atol=1e-5, rtol=1e-4)

    grads = union_backward(grad_out, grad_lse, q, k, v, *want, graph, bias, attr, masks, window,
                           dilation, scale)
    assert len(grads) == len(want_grads)
    for got, expected in zip(grads, want_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
