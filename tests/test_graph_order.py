"""Node orderings (RCM, Morton) and the K-hop adjacency against dense references."""
import pytest
import torch

from gtkernels.graph_order import khop, morton_order, rcm_order
from utils import DEVICE_PARAMS


def grid_edges(side, device):
    """Both directions of the 6-neighbourhood of a side^3 grid in lexicographic order."""
    idx = torch.arange(side**3, device=device).view(side, side, side)
    edges = []
    for axis in range(3):
        a, b = idx.narrow(axis, 0, side - 1).flatten(), idx.narrow(axis, 1, side - 1).flatten()
        edges += [torch.stack([a, b]), torch.stack([b, a])]
    return torch.cat(edges, 1)


def to_csr(edge_index, n):
    """CSR by destination: the neighbours of node i are its in-neighbours."""
    order = torch.argsort(edge_index[1] * n + edge_index[0])
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=edge_index.device)
    ptr[1:] = torch.bincount(edge_index[1], minlength=n).cumsum(0)
    return ptr, edge_index[0][order]


def bandwidth(edge_index, perm):
    """max |p(i) - p(j)| over edges when node perm[p] is placed at p."""
    place = torch.empty_like(perm)
    place[perm] = torch.arange(perm.numel(), device=perm.device)
    return int((place[edge_index[0]] - place[edge_index[1]]).abs().max())


def assert_permutation(perm, n):
    assert perm.dtype == torch.int64 and perm.shape == (n,)
    assert torch.equal(perm.sort().values.cpu(), torch.arange(n))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_rcm_recovers_grid_bandwidth(device):
    side = 10
    n = side**3
    edges = grid_edges(side, device)
    shuffle = torch.randperm(n, device=device)
    shuffled = shuffle[edges]  # node v of the grid is node shuffle[v]
    perm = rcm_order(*to_csr(shuffled, n))
    assert_permutation(perm, n)
    lexicographic = bandwidth(edges, torch.arange(n, device=device))  # side**2 = 100
    assert bandwidth(shuffled, torch.arange(n, device=device)) > 5 * lexicographic
    assert bandwidth(shuffled, perm) <= 1.2 * lexicographic


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_rcm_components_isolated_nodes_loops_duplicates(device):
    # Two shuffled paths (7 and 5 nodes), two isolated nodes, a self loop, a duplicate edge.
    labels = torch.randperm(14, device=device)
    path_a = [(i, i + 1) for i in range(6)]
    path_b = [(7 + i, 8 + i) for i in range(4)]
    pairs = path_a + path_b + [(3, 3), (0, 1)]
    edges = labels[torch.tensor(pairs, device=device).t()]
    perm = rcm_order(*to_csr(edges, 14))
    assert_permutation(perm, 14)
    assert bandwidth(edges[:, edges[0] != edges[1]], perm) == 1
    place = torch.empty_like(perm)
    place[perm] = torch.arange(14, device=device)
    for nodes in (labels[:7], labels[7:12]):  # each component is one contiguous run
        spots = place[nodes]
        assert int(spots.max() - spots.min()) == nodes.numel() - 1


def test_rcm_trivial_graphs():
    empty = torch.empty(0, dtype=torch.int64)
    assert rcm_order(torch.zeros(1, dtype=torch.int64), empty).numel() == 0
    assert_permutation(rcm_order(torch.zeros(4, dtype=torch.int32),
                                 torch.empty(0, dtype=torch.int32)), 3)


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_morton_order_2d_is_z_curve(device):
    xy = torch.stack(torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    xy = xy.view(-1, 2).to(device)
    perm = morton_order(xy)
    assert_permutation(perm, 16)
    first_quad = xy[perm[:4]].tolist()
    assert first_quad == [[0, 0], [1, 0], [0, 1], [1, 1]]
    # Each aligned 2x2 quadrant of the 4x4 grid is one run of 4 on the curve.
    quadrant = (xy[perm] // 2).tolist()
    assert all(quadrant[4 * q] == quadrant[4 * q + i] for q in range(4) for i in range(4))


@pytest.mark.parametrize("device", DEVICE_PARAMS)
def test_morton_order_3d_groups_nearby_points(device):
    pos = torch.rand(4000, 3, device=device, dtype=torch.float64) * 100 - 20
    perm = morton_order(pos)
    assert_permutation(perm, 4000)
    step = (pos[perm][1:] - pos[perm][:-1]).norm(dim=1).mean()
    random_step = (pos[1:] - pos[:-1]).norm(dim=1).mean()
    assert step < random_step / 4


def test_morton_order_ties_and_single_point():
    assert torch.equal(morton_order(torch.ones(5, 3)), torch.arange(5))
    assert morton_order(torch.empty(0, 2)).numel() == 0


def dense_khop(edge_index, k, n):
    adjacency = torch.zeros(n, n, dtype=torch.int64)
    adjacency[edge_index[1], edge_index[0]] = 1  # [destination, source]
    reach, power = torch.zeros_like(adjacency), torch.eye(n, dtype=torch.int64)
    for _ in range(k):
        power = (adjacency @ power).clamp(max=1)
        reach |= power
    dst, src = reach.nonzero().t()  # sorted by destination, then source
    return torch.stack([src, dst])


@pytest.mark.parametrize("device", DEVICE_PARAMS)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_khop_matches_dense_powers(device, k):
    n = 45
    edges = torch.randint(0, n, (2, 100), device=device)
    edges = torch.cat([edges, edges[:, :7]], 1)  # duplicates
    got = khop(edges.to(torch.int32), k, num_nodes=n)
    assert got.dtype == torch.int64
    assert torch.equal(got.cpu(), dense_khop(edges.cpu(), k, n))


def test_khop_one_is_the_coalesced_graph():
    edges = torch.tensor([[2, 0, 1, 0], [0, 1, 2, 1]])
    assert torch.equal(khop(edges, 1), torch.tensor([[2, 0, 1], [0, 1, 2]]))
    assert khop(torch.empty(2, 0, dtype=torch.int64), 3, num_nodes=4).shape == (2, 0)


@pytest.mark.parametrize("bad,match", [
    (lambda: rcm_order(torch.tensor([0, 1]), torch.tensor([5])), r"indices must be in \[0, 1\)"),
    (lambda: rcm_order(torch.tensor([0, 2, 1]), torch.tensor([0, 1])), "non-decreasing"),
    (lambda: rcm_order(torch.tensor([0, 1]), torch.tensor([0]), num_nodes=3),
     r"indptr must be \[N \+ 1\]"),
    (lambda: rcm_order(torch.tensor([0.0, 1.0]), torch.tensor([0])), "indptr must have dtype"),
    (lambda: morton_order(torch.rand(5, 4)), r"pos must be \[N, 2\] or \[N, 3\]"),
    (lambda: morton_order(torch.tensor([[0.0, float("nan")]])), "pos must be finite"),
    (lambda: khop(torch.tensor([[0, 1]]), 2), r"edge_index must be \[2, E\]"),
    (lambda: khop(torch.tensor([[0], [1]]), 0), r"k must be in \[1,"),
    (lambda: khop(torch.tensor([[0], [3]]), 2, num_nodes=2), r"edge_index must be in \[0, 2\)"),
])
def test_bad_inputs(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()
