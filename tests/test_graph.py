"""gk.Graph: CSR/CSC construction, edge permutation, validation, transforms."""
import pytest
import torch

import gtkernels as gk
from graph_cases import random_edge_index
from utils import DEVICE_PARAMS


def csr_edges(g):
    """(source, destination) pairs in CSR order."""
    dst = torch.repeat_interleave(torch.arange(g.num_nodes), g.indptr.diff().cpu())
    return torch.stack([g.indices.long().cpu(), dst])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_from_edge_index_sorts_by_destination(device, index_dtype):
    edge_index = random_edge_index(13, 60, isolated=3).to(device, index_dtype)
    g = gk.Graph.from_edge_index(edge_index, num_nodes=13)
    assert (g.num_nodes, g.num_edges) == (13, 60)
    assert g.indptr.dtype == torch.int64 and g.indices.dtype == torch.int32
    pairs = csr_edges(g)
    assert bool((pairs[1].diff() >= 0).all())
    # edge_perm maps CSR positions to construction-order edge ids
    assert torch.equal(edge_index.long().cpu()[:, g.edge_perm.cpu()], pairs)
    assert torch.equal(g.edge_index().cpu(), edge_index.long().cpu())


def test_csc_is_the_transpose():
    g = gk.Graph.from_edge_index(random_edge_index(11, 50))
    pairs = csr_edges(g)
    csc_src = torch.repeat_interleave(torch.arange(11), g.csc_indptr.diff())
    ids = g.csc_edge_ids.long()
    assert bool((csc_src.diff() >= 0).all())
    assert torch.equal(pairs[0, ids], csc_src)
    assert torch.equal(pairs[1, ids], g.csc_indices.long())
    assert torch.equal(ids.sort().values, torch.arange(50))


def test_sorted_edge_index_keeps_order():
    edge_index = torch.tensor([[2, 0, 1, 2], [0, 0, 1, 3]])
    g = gk.Graph.from_edge_index(edge_index)
    assert g.edge_perm is None and g.num_nodes == 4
    assert g.indptr.tolist() == [0, 2, 3, 3, 4]


def test_from_csr_matches_from_edge_index():
    g1 = gk.Graph.from_edge_index(random_edge_index(9, 30))
    g2 = gk.Graph.from_csr(g1.indptr, g1.indices)
    assert g2.edge_perm is None
    for name in ("indptr", "indices", "csc_indptr", "csc_indices", "csc_edge_ids"):
        assert torch.equal(getattr(g1, name), getattr(g2, name)), name


@pytest.mark.parametrize("num_nodes", [0, 5])
def test_empty_graphs(num_nodes):
    empty = torch.zeros(2, 0, dtype=torch.int64)
    g = gk.Graph.from_edge_index(empty, num_nodes=num_nodes)
    assert (g.num_nodes, g.num_edges) == (num_nodes, 0)
    assert g.indptr.tolist() == [0] * (num_nodes + 1)
    assert gk.Graph.from_edge_index(empty).num_nodes == 0
    g2 = gk.Graph.from_csr(torch.zeros(num_nodes + 1, dtype=torch.int64),
                           torch.zeros(0, dtype=torch.int32))
    assert (g2.num_nodes, g2.num_edges) == (num_nodes, 0)


def test_coalesce_dedupes_and_sorts():
    edge_index = torch.tensor([[1, 0, 1, 2, 0], [2, 2, 2, 0, 2]])
    g = gk.Graph.from_edge_index(edge_index, num_nodes=3).coalesce()
    assert csr_edges(g).tolist() == [[2, 0, 1], [0, 2, 2]]
    assert g.edge_perm is None


def test_add_self_loops_appends_loops_last():
    edge_index = torch.tensor([[1, 0], [0, 2]])
    g = gk.Graph.from_edge_index(edge_index, num_nodes=3).add_self_loops()
    assert g.num_edges == 5
    assert g.edge_index().tolist() == [[1, 0, 0, 1, 2], [0, 2, 0, 1, 2]]


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_to_moves_every_tensor(device):
    g = gk.Graph.from_edge_index(random_edge_index(7, 20)).to(device)
    for t in (g.indptr, g.indices, g.edge_perm, g.csc_indptr, g.csc_indices, g.csc_edge_ids):
        assert t.device.type == device
    assert g.to(device) is g


@pytest.mark.parametrize("build,match", [
    (lambda: gk.Graph.from_edge_index(torch.tensor([[0, -1], [1, 1]])), "negative node index"),
    (lambda: gk.Graph.from_edge_index(torch.tensor([[0, 5], [1, 1]]), num_nodes=5),
     "node index 5 out of range for num_nodes = 5"),
    (lambda: gk.Graph.from_edge_index(torch.tensor([[0.0, 1.0], [1.0, 0.0]])),
     "edge_index must have dtype in"),
    (lambda: gk.Graph.from_edge_index(torch.zeros(3, 4, dtype=torch.int64)), r"\[2, E\]"),
    (lambda: gk.Graph.from_edge_index(torch.zeros(8, dtype=torch.int64)), "2 dims"),
    (lambda: gk.Graph.from_csr(torch.tensor([0, 2, 1, 3]), torch.zeros(3, dtype=torch.int64)),
     "unsorted CSR"),
    (lambda: gk.Graph.from_csr(torch.tensor([1, 2, 3]), torch.zeros(3, dtype=torch.int64)),
     "unsorted CSR"),
    (lambda: gk.Graph.from_csr(torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.int64)),
     "unsorted CSR"),
    (lambda: gk.Graph.from_csr(torch.tensor([0, 1, 2]), torch.tensor([0, 2])),
     "node index 2 out of range"),
    (lambda: gk.Graph.from_csr(torch.tensor([0, 1]), torch.tensor([0]), num_nodes=3),
     r"indptr must be \[num_nodes \+ 1\]"),
])
def test_bad_graphs(build, match):
    with pytest.raises((ValueError, TypeError), match=match):
        build()


def _grid_edges(n):
    """Edges of an n x n x n grid, 6-neighbourhood, both directions."""
    idx = torch.arange(n**3).view(n, n, n)
    pairs = [torch.stack([idx.narrow(d, 0, n - 1).flatten(), idx.narrow(d, 1, n - 1).flatten()])
             for d in range(3)]
    e = torch.cat(pairs, dim=1)
    return torch.cat([e, e.flip(0)], dim=1)


@pytest.mark.parametrize("method", ["rcm", "morton"])
def test_reorder_is_a_relabelling_that_restores_locality(method):
    n = 8
    edge_index = _grid_edges(n)
    shuffle = torch.randperm(n**3)
    old_of_new = torch.empty_like(shuffle)
    old_of_new[shuffle] = torch.arange(n**3)
    shuffled = gk.Graph.from_edge_index(shuffle[edge_index], n**3)
    pos = torch.stack(torch.meshgrid(*[torch.arange(n)] * 3, indexing="ij"), -1).view(-1, 3)
    g, perm = shuffled.reorder(method, pos=pos[old_of_new].float())
    assert torch.equal(perm.sort().values, torch.arange(n**3))
    e = g.edge_index()
    assert g.num_edges == shuffled.num_edges
    # the same graph, relabelled: edge (a, b) of g is edge (perm[a], perm[b]) of `shuffled`
    assert torch.equal(perm[e], shuffled.edge_index())
    mean_span = lambda ei: (ei[0] - ei[1]).abs().float().mean().item()  # noqa: E731
    assert mean_span(e) < n * n < mean_span(shuffled.edge_index())


def test_reorder_bad_method():
    g = gk.Graph.from_edge_index(torch.tensor([[0], [1]]))
    with pytest.raises(ValueError, match="method must be one of"):
        g.reorder("spectral")
    with pytest.raises(ValueError, match="needs pos"):
        g.reorder("morton")


def test_khop_matches_dense_powers():
    edge_index = torch.randint(0, 12, (2, 20))
    g = gk.Graph.from_edge_index(edge_index, 12)
    a = torch.zeros(12, 12, dtype=torch.long)
    a[edge_index[1], edge_index[0]] = 1  # a[i, j]: edge j -> i
    reach = (a + a @ a).clamp(max=1)
    e = g.khop(2).edge_index()
    dense = torch.zeros_like(a)
    dense[e[1], e[0]] = 1
    assert torch.equal(dense, reach)
