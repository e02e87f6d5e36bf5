"""Node orderings that make a window over node order local, and the K-hop adjacency.

Standalone functions on CSR / edge_index tensors (any device; vectorised torch, so they run on
the GPU for large graphs). They validate their inputs, which syncs with the host: they are
preprocessing, run once per graph, not inside a training step.
"""
import torch

from . import _validate as V

MORTON_BITS = {2: 31, 3: 21}  # bits per coordinate: 62 or 63 bits of an int64 code


def rcm_order(indptr, indices, num_nodes=None):
    """Reverse Cuthill-McKee order of a graph given as CSR.

    Args:
        indptr: int32/int64 ``[N + 1]``, indices: int32/int64 ``[E]``: the neighbours of node i
            are ``indices[indptr[i]:indptr[i+1]]``. Direction is ignored (the graph is
            symmetrised), and so are self loops and duplicate edges.
        num_nodes: N, default ``indptr.numel() - 1``.

    Returns:
        perm int64 ``[N]``: node ``perm[p]`` of the given graph is node p of the reordered one
        (reorder features with ``x[perm]``). Each connected component is a breadth-first search
        from a pseudo-peripheral node (George-Liu: the lowest-degree node of the last level of a
        search from a lowest-degree node), each level's new nodes sorted by the position of their
        first visited neighbour, then by degree; the whole order is reversed. It bounds the
        bandwidth ``max |p(i) - p(j)|`` over edges by about twice the widest level.

    The searches run level by level on tensors (one host sync per level); components run one
    after another, isolated nodes all at once.

    Example::

        perm = rcm_order(indptr, indices)         # a 3D grid shuffled -> bandwidth ~ a slab
        x, pos = x[perm], pos[perm]
    """
    n = _check_csr(indptr, indices, num_nodes)
    sym_ptr, sym_idx = _symmetric_csr(indptr, indices, n)
    degree = sym_ptr.diff()
    position = torch.full((n,), -1, dtype=torch.int64, device=indices.device)
    isolated = (degree == 0).nonzero().flatten()
    position[isolated] = torch.arange(isolated.numel(), device=indices.device)
    placed = isolated.numel()
    unplaced_degree = torch.where(degree == 0, n, degree)  # n: never picked as a start
    while placed < n:
        start = int(torch.argmin(unplaced_degree))
        probe = _cuthill_mckee(sym_ptr, sym_idx, degree, start, position, placed)
        last_level = probe[-1]
        start = int(last_level[torch.argmin(degree[last_level])])
        position[torch.cat(probe)] = -1
        levels = _cuthill_mckee(sym_ptr, sym_idx, degree, start, position, placed)
        component = torch.cat(levels)
        unplaced_degree[component] = n
        placed += component.numel()
    order = torch.empty_like(position)
    order[position] = torch.arange(n, device=position.device)
    return order.flip(0)


def _cuthill_mckee(indptr, indices, degree, start, position, offset):
    """Breadth-first search from `start` over unplaced nodes (position < 0) in Cuthill-McKee
    order; writes positions offset, offset + 1, ... and returns the levels (node tensors)."""
    device = indices.device
    frontier = torch.tensor([start], device=device)
    position[frontier] = offset
    next_position = offset + 1
    levels = [frontier]
    max_degree = int(degree.max()) + 1
    while True:
        counts = degree[frontier]
        total = int(counts.sum())
        if total == 0:
            break
        first_edge = torch.repeat_interleave(indptr[frontier] - (counts.cumsum(0) - counts),
                                             counts, output_size=total)
        neighbours = indices[first_edge + torch.arange(total, device=device)]
        parent_position = torch.repeat_interleave(position[frontier], counts, output_size=total)
        fresh = position[neighbours] < 0
        neighbours, parent_position = neighbours[fresh], parent_position[fresh]
        if neighbours.numel() == 0:
            break
        # Each new node keeps its earliest-placed neighbour (the one that visits it first).
        keys, _ = torch.sort(neighbours * (position.numel() + 1) + parent_position)
        nodes = keys // (position.numel() + 1)
        first = torch.ones_like(nodes, dtype=torch.bool)
        first[1:] = nodes[1:] != nodes[:-1]
        nodes, parent_position = nodes[first], (keys % (position.numel() + 1))[first]
        # Sort by (parent position, degree); nodes are already in id order (stable ties).
        rank = torch.sort(parent_position * max_degree + degree[nodes], stable=True).indices
        frontier = nodes[rank]
        position[frontier] = torch.arange(next_position, next_position + frontier.numel(),
                                          device=device)
        next_position += frontier.numel()
        levels.append(frontier)
    return levels


def morton_order(pos):
    """Morton (Z-order) curve order of points.

    Args:
        pos: float ``[N, 2]`` or ``[N, 3]`` finite coordinates, any device.

    Returns:
        perm int64 ``[N]``: points sorted by the interleaved bits of their coordinates quantised
        on a common grid of 2**31 (2D) or 2**21 (3D) cells per axis over the bounding box (ties
        keep index order). Reorder with ``x[perm]``. Points close on the curve are close in
        space, so a window over this order is local.

    Example::

        perm = morton_order(mesh_pos)     # [N, 3] -> [N]
    """
    V.check_tensor("pos", pos, dtypes=V.FLOAT_DTYPES, dim=2)
    dims = pos.shape[1]
    if dims not in MORTON_BITS:
        raise ValueError(f"pos must be [N, 2] or [N, 3], got shape {list(pos.shape)}")
    if pos.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=pos.device)
    if not bool(torch.isfinite(pos).all()):
        raise ValueError("pos must be finite (found NaN or inf)")
    bits = MORTON_BITS[dims]
    pos = pos.double()
    low = pos.min(0).values
    extent = float((pos.max(0).values - low).max())
    cells = 2**bits - 1
    grid = ((pos - low) * (cells / extent if extent > 0 else 0.0)).floor().clamp(0, cells)
    grid = grid.to(torch.int64)
    spread = _spread_bits_2d if dims == 2 else _spread_bits_3d
    code = torch.zeros(pos.shape[0], dtype=torch.int64, device=pos.device)
    for axis in range(dims):
        code |= spread(grid[:, axis]) << axis
    return torch.sort(code, stable=True).indices


def _spread_bits_2d(x):
    """Bit b of x (31 bits) moves to bit 2b."""
    x = (x | (x << 16)) & 0x0000FFFF0000FFFF
    x = (x | (x << 8)) & 0x00FF00FF00FF00FF
    x = (x | (x << 4)) & 0x0F0F0F0F0F0F0F0F
    x = (x | (x << 2)) & 0x3333333333333333
    return (x | (x << 1)) & 0x5555555555555555


def _spread_bits_3d(x):
    """Bit b of x (21 bits) moves to bit 3b."""
    x = (x | (x << 32)) & 0x001F00000000FFFF
    x = (x | (x << 16)) & 0x001F0000FF0000FF
    x = (x | (x << 8)) & 0x100F00F00F00F00F
    x = (x | (x << 4)) & 0x10C30C30C30C30C3
    return (x | (x << 2)) & 0x1249249249249249


def khop(edge_index, k, num_nodes=None):
    """K-hop adjacency: an edge j -> i wherever a directed path of 1 to k edges leads from j to i.

    Args:
        edge_index: int32/int64 ``[2, E]``, row 0 = source, row 1 = destination.
        k: int >= 1.
        num_nodes: N, default ``edge_index.max() + 1``.

    Returns:
        int64 ``[2, E_k]``: the edges of boolean ``A + A^2 + ... + A^k`` (paths that return to
        their start give self loops), coalesced: sorted by destination, then source, no
        duplicates. ``khop(e, 1)`` is ``e`` coalesced.

    Each step extends only the pairs first reached at the previous step (a shortest path's
    prefix is one) by one edge, with sorted-key merges: memory is the candidates of one step.

    Example::

        two_hop = khop(edge_index, 2)     # the mesh papers' 2-hop neighbourhood
    """
    V.check_tensor("edge_index", edge_index, dtypes=V.INDEX_DTYPES, dim=2)
    if edge_index.shape[0] != 2:
        raise ValueError(f"edge_index must be [2, E], got shape {list(edge_index.shape)}")
    V.check_int_range("k", k, 1, 2**31)
    n = _check_num_nodes(edge_index, num_nodes)
    src, dst = edge_index.long()
    reached = torch.unique(dst * n + src)  # keys dst * n + src, sorted
    out_ptr, out_dst = _csr_by_source(src, dst, n)
    new = reached
    for _ in range(k - 1):
        if new.numel() == 0:
            break
        start, middle = new % n, new // n  # pairs start -> middle, extended by middle -> end
        counts = out_ptr[middle + 1] - out_ptr[middle]
        total = int(counts.sum())
        first_edge = torch.repeat_interleave(out_ptr[middle] - (counts.cumsum(0) - counts), counts,
                                             output_size=total)
        end = out_dst[first_edge + torch.arange(total, device=new.device)]
        candidates = torch.unique(end * n + torch.repeat_interleave(start, counts,
                                                                    output_size=total))
        found = torch.searchsorted(reached, candidates).clamp_max(max(reached.numel() - 1, 0))
        new = candidates[reached[found] != candidates] if reached.numel() else candidates
        reached = torch.sort(torch.cat([reached, new])).values
    return torch.stack([reached % n, reached // n])


def _csr_by_source(src, dst, n):
    order = torch.argsort(src * n + dst)
    counts = torch.bincount(src, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=src.device)
    ptr[1:] = counts.cumsum(0)
    return ptr, dst[order]


def _symmetric_csr(indptr, indices, n):
    """CSR of the undirected simple graph: both directions, no self loops, no duplicates."""
    counts = indptr.long().diff()
    rows = torch.repeat_interleave(torch.arange(n, device=indices.device), counts)
    cols = indices.long()
    keys = torch.cat([rows * n + cols, cols * n + rows])
    keys = torch.unique(keys[rows.repeat(2) != cols.repeat(2)])
    ptr = torch.zeros(n + 1, dtype=torch.int64, device=indices.device)
    ptr[1:] = torch.bincount(keys // n, minlength=n).cumsum(0)
    return ptr, keys % n


def _check_csr(indptr, indices, num_nodes):
    V.check_tensor("indptr", indptr, dtypes=V.INDEX_DTYPES, dim=1)
    V.check_tensor("indices", indices, dtypes=V.INDEX_DTYPES, dim=1)
    V.check_same_device(indptr=indptr, indices=indices)
    n = indptr.numel() - 1 if num_nodes is None else num_nodes
    V.check_int_range("num_nodes", n, 0, 2**31)
    if indptr.numel() != n + 1:
        raise ValueError(f"indptr must be [N + 1] = [{n + 1}], got [{indptr.numel()}]")
    if n > 0 and (int(indptr[0]) != 0 or int(indptr[-1]) != indices.numel()
                  or bool((indptr.diff() < 0).any())):
        raise ValueError("indptr must start at 0, be non-decreasing and end at indices.numel()")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"indices must be in [0, {n}), got values in "
                         f"[{int(indices.min())}, {int(indices.max())}]")
    return n


def _check_num_nodes(edge_index, num_nodes):
    largest = int(edge_index.max()) if edge_index.numel() else -1
    n = largest + 1 if num_nodes is None else num_nodes
    V.check_int_range("num_nodes", n, 0, 2**31)
    if edge_index.numel() and (int(edge_index.min()) < 0 or largest >= n):
        raise ValueError(f"edge_index must be in [0, {n}), got values in "
                         f"[{int(edge_index.min())}, {largest}]")
    return n
