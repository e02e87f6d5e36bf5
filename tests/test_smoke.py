"""One call of every public op on small inputs, forward and backward: a quick check that a
build works (CI runs it against the CPU-only torch too)."""
import torch

import gtkernels as gk


def _backward_is_finite(out, *inputs):
    out.float().square().sum().backward()
    return all(t.grad is not None and torch.isfinite(t.grad).all() for t in inputs)


def test_sign_hash_smoke():
    assert gk.sign_hash(torch.randn(4, 16), 4).shape == (4, 4)


def test_graph_attention_smoke():
    edge_index = torch.tensor([[0, 1, 2, 2], [1, 2, 0, 1]])
    g = gk.Graph.from_edge_index(edge_index, num_nodes=3)
    q, k, v = (torch.randn(3, 2, 8, requires_grad=True) for _ in range(3))
    assert _backward_is_finite(gk.graph_attention(q, k, v, g), q, k, v)


def test_window_attention_smoke():
    q, k, v = (torch.randn(10, 2, 16, requires_grad=True) for _ in range(3))
    assert _backward_is_finite(gk.window_attention(q, k, v, 2, dilation=2, num_global=1), q, k, v)


def test_hashed_lookup_smoke():
    x = torch.randn(5, 16, requires_grad=True)
    tables = torch.randn(4, 16, 8, requires_grad=True)
    assert _backward_is_finite(gk.hashed_lookup(x, tables, tau=4), x, tables)


def test_weighted_gather_sum_smoke():
    table = torch.randn(10, 8, requires_grad=True)
    weights = torch.rand(6, 3, requires_grad=True)
    y = gk.weighted_gather_sum(table, torch.randint(0, 10, (6, 3)), weights)
    assert _backward_is_finite(y, table, weights)
