"""Positional and structural encodings of graph transformers: Laplacian eigenvector PE and
random-walk structural encoding (RWSE), computed on the graph's device.

Both treat the graph as undirected and simple: edges are symmetrised, duplicates merged and
self-loops dropped. They are precomputations (host syncs allowed), done once per graph.
"""
import warnings

import torch

from .. import _validate as V
from ..graph import Graph
from ._graph_input import edge_endpoints

DENSE_MAX_NODES = 4096


def laplacian_pe(graph, k, *, num_nodes=None, return_eigenvalues=False, dense_max_nodes=None,
                 niter=1000, tol=1e-6):
    """Eigenvectors of the k smallest non-trivial eigenvalues of the normalised Laplacian
    ``L = I - D^-1/2 A D^-1/2``.

    Args:
        graph: a `Graph` or an int ``edge_index`` ``[2, E]`` (then ``num_nodes``, default
            ``max + 1``).
        k: number of eigenvectors. The first eigenpair (eigenvalue 0) is dropped; a graph with
            fewer than ``k + 1`` nodes gets zero columns after its ``N - 1`` eigenvectors.
        dense_max_nodes: up to this many nodes a dense ``eigh`` (exact) is used, beyond it
            ``torch.lobpcg`` on the sparse L (default 4096). lobpcg stops after ``niter``
            iterations or at residual ``tol``; on large meshes, whose low spectrum is nearly
            degenerate, it may need many iterations.

    Returns ``pe`` float32 ``[N, k]`` on the graph's device (unit-norm columns with arbitrary
    sign: apply `random_sign_flip` in training), and with ``return_eigenvalues`` also the
    eigenvalues ``[k]`` ascending. Computed in float64 on CPU, float32 on GPU.

    Example::

        pe = gk.nn.laplacian_pe(g, k=8)                  # [N, 8]
        x = torch.cat([x, gk.nn.random_sign_flip(pe)], 1) if model.training else ...
    """
    V.check_int_range("k", k, 1, 2**31 - 1)
    src, dst, n = _simple_undirected_edges(graph, num_nodes)
    dtype = torch.float64 if src.device.type == "cpu" else torch.float32
    laplacian = _normalized_laplacian(src, dst, n, dtype)
    wanted = min(k + 1, n)
    limit = DENSE_MAX_NODES if dense_max_nodes is None else dense_max_nodes
    if n <= limit or 3 * wanted > n:
        values, vectors = torch.linalg.eigh(laplacian.to_dense())
        values, vectors = values[:wanted], vectors[:, :wanted]
    else:
        start = torch.randn(n, wanted, dtype=dtype, device=src.device)
        values, vectors = torch.lobpcg(laplacian, X=start, largest=False, niter=niter, tol=tol)
        order = torch.argsort(values)
        values, vectors = values[order], vectors[:, order]
    pe = vectors.new_zeros(n, k)
    pe[:, :wanted - 1] = vectors[:, 1:]
    pe = pe.float()
    if not return_eigenvalues:
        return pe
    eigenvalues = values.new_zeros(k)
    eigenvalues[:wanted - 1] = values[1:]
    return pe, eigenvalues.float()


def random_sign_flip(pe, generator=None):
    """``pe`` ``[N, k]`` with each column multiplied by an independent random sign (the
    eigenvector sign ambiguity, as augmentation in training)."""
    V.check_tensor("pe", pe, dtypes=V.FLOAT_DTYPES, dim=2)
    signs = torch.randint(0, 2, (1, pe.shape[1]), generator=generator, device=pe.device)
    return pe * (2 * signs - 1).to(pe.dtype)


def random_walk_se(graph, k, *, num_nodes=None):
    """Random-walk structural encoding: the return probabilities ``(P^t)_ii`` for
    ``t = 1..k`` of the random walk ``P = D^-1 A``.

    Uses ``diag(P^t) = diag(S^t)`` with the symmetric ``S = D^-1/2 A D^-1/2`` and
    ``diag(S^(a+b))_i = sum_j (S^a)_ij (S^b)_ij``, so sparse powers up to ``S^ceil(k/2)`` are
    formed (one sparse-sparse matmul per two steps, memory of the ``ceil(k/2)``-hop
    neighbourhoods). Isolated nodes get zeros.

    Args: graph as for `laplacian_pe`; k >= 1 walk lengths.
    Returns float32 ``[N, k]`` on the graph's device (float64 arithmetic on CPU).

    Example::

        se = gk.nn.random_walk_se(g, k=16)               # [N, 16]
    """
    V.check_int_range("k", k, 1, 2**31 - 1)
    src, dst, n = _simple_undirected_edges(graph, num_nodes)
    dtype = torch.float64 if src.device.type == "cpu" else torch.float32
    step = _normalized_adjacency(src, dst, n, dtype)
    eye = torch.arange(n, device=src.device)
    low = torch.sparse_coo_tensor(torch.stack([eye, eye]), torch.ones(n, dtype=dtype,
                                  device=src.device), (n, n), check_invariants=False).coalesce()
    high = step
    columns = []
    for t in range(1, k + 1):
        if t % 2:
            columns.append(_row_dots(low, high))
            continue
        columns.append(_row_dots(high, high))
        if t < k:
            with warnings.catch_warnings():  # sparse.mm goes through the "beta" CSR path
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support")
                low, high = high, torch.sparse.mm(high, step).coalesce()
    return torch.stack(columns, 1).float()


def _row_dots(a, b):
    """``sum_j a_ij b_ij`` of two coalesced sparse [n, n] matrices -> dense [n]."""
    return torch.sparse.sum(a * b, dim=1).to_dense()


def _simple_undirected_edges(graph, num_nodes):
    if isinstance(graph, Graph):
        src, dst = edge_endpoints(graph)
        n = graph.num_nodes
    else:
        graph = Graph.from_edge_index(graph, num_nodes=num_nodes)
        src, dst = edge_endpoints(graph)
        n = graph.num_nodes
    keep = src != dst
    pairs = torch.cat([torch.stack([src[keep], dst[keep]]), torch.stack([dst[keep], src[keep]])], 1)
    pairs = torch.unique(pairs, dim=1)
    return pairs[0], pairs[1], n


def _normalized_adjacency(src, dst, n, dtype):
    """Coalesced sparse ``D^-1/2 A D^-1/2`` of the symmetric simple edge list."""
    degree = torch.bincount(src, minlength=n).to(dtype)
    values = (degree[src] * degree[dst]).rsqrt()
    return torch.sparse_coo_tensor(torch.stack([src, dst]), values, (n, n),
                                   check_invariants=False).coalesce()


def _normalized_laplacian(src, dst, n, dtype):
    adjacency = _normalized_adjacency(src, dst, n, dtype)
    eye = torch.arange(n, device=src.device)
    identity = torch.sparse_coo_tensor(torch.stack([eye, eye]), torch.ones(n, dtype=dtype,
                                       device=src.device), (n, n),
                                       check_invariants=False)
    return (identity - adjacency).coalesce()
