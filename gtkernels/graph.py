"""The Graph container: edges sorted by destination (CSR) with the transpose (CSC) cached.

Node i attends over its in-neighbours j (edge j -> i, PyG's source_to_target flow). A Graph is
built once, validated once (index range, dtype, CSR order: the only host syncs of graph
attention happen here) and then reused by every `graph_attention` call.
"""
import torch

from . import _validate as V

INT32_MAX = 2**31 - 1


class Graph:
    """Edges of a directed graph, grouped by destination, with the transpose for the backward.

    Attributes (all on one device):
        num_nodes, num_edges: ints.
        indptr: int64 ``[N + 1]``; the in-edges of node i sit at CSR positions
            ``indptr[i]:indptr[i + 1]``.
        indices: int32 (int64 if N or E >= 2**31) ``[E]``, the source of each CSR edge.
        edge_perm: int64 ``[E]`` or None: ``edge_perm[p]`` is the construction-order id of
            the edge at CSR position p (None: construction order is CSR order).
        csc_indptr: int64 ``[N + 1]``; the out-edges of node j sit at CSC positions
            ``csc_indptr[j]:csc_indptr[j + 1]``.
        csc_indices: ``[E]`` destination of each CSC edge; csc_edge_ids: ``[E]`` its CSR position.

    Per-edge tensors (edge_bias, edge_attr) are given in construction order: the order of
    ``edge_index``'s columns for `from_edge_index`, CSR order for `from_csr`.
    """

    def __init__(self, num_nodes, indptr, indices, edge_perm, csc_indptr, csc_indices,
                 csc_edge_ids):
        self.num_nodes = num_nodes
        self.indptr = indptr
        self.indices = indices
        self.edge_perm = edge_perm
        self.csc_indptr = csc_indptr
        self.csc_indices = csc_indices
        self.csc_edge_ids = csc_edge_ids
        self._coalesced = None  # is_coalesced(), computed on first use

    @property
    def num_edges(self):
        return self.indices.shape[0]

    @property
    def device(self):
        return self.indptr.device

    def __repr__(self):
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges}, device={self.device})"

    @classmethod
    def from_edge_index(cls, edge_index, num_nodes=None):
        """edge_index: int32/int64 ``[2, E]``, row 0 = source j, row 1 = destination i.

        num_nodes defaults to ``edge_index.max() + 1`` (0 for E = 0). Raises on negative
        indices or indices >= num_nodes."""
        V.check_tensor("edge_index", edge_index, dtypes=V.INDEX_DTYPES, dim=2)
        if edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must be [2, E], got {list(edge_index.shape)}")
        num_nodes = _check_node_indices("edge_index", edge_index, num_nodes)
        src, dst = edge_index[0].long(), edge_index[1].long()
        edge_perm = None
        if dst.numel() > 1 and not bool((dst[1:] >= dst[:-1]).all()):
            edge_perm = torch.argsort(dst, stable=True)
            src, dst = src[edge_perm], dst[edge_perm]
        return cls._from_sorted(num_nodes, src, dst, edge_perm)

    @classmethod
    def from_csr(cls, indptr, indices, num_nodes=None):
        """indptr: int32/int64 ``[N + 1]`` (0 first, non-decreasing, E last); indices:
        int32/int64 ``[E]``, the sources (keys) of node i at ``indices[indptr[i]:indptr[i+1]]``."""
        V.check_tensor("indptr", indptr, dtypes=V.INDEX_DTYPES, dim=1)
        V.check_tensor("indices", indices, dtypes=V.INDEX_DTYPES, dim=1)
        V.check_same_device(indptr=indptr, indices=indices)
        if indptr.shape[0] < 1:
            raise ValueError("indptr must have N + 1 >= 1 entries, got 0")
        n = indptr.shape[0] - 1
        if num_nodes is not None and num_nodes != n:
            raise ValueError(f"indptr must be [num_nodes + 1] = [{num_nodes + 1}], got [{n + 1}]")
        indptr = indptr.long()
        num_edges = indices.shape[0]
        first, last = int(indptr[0]), int(indptr[-1])
        if first != 0 or last != num_edges or (n > 0 and not bool((indptr[1:] >= indptr[:-1]).all())):
            raise ValueError("unsorted CSR: indptr must start at 0, be non-decreasing and end at "
                             f"len(indices) = {num_edges} (got first {first}, last {last})")
        _check_node_indices("indices", indices, n)
        dst = torch.repeat_interleave(torch.arange(n, device=indptr.device), indptr.diff())
        return cls._from_sorted(n, indices.long(), dst, None)

    @classmethod
    def _from_sorted(cls, num_nodes, src, dst, edge_perm):
        """src, dst: int64 [E], already sorted by dst (stable) and validated."""
        device = src.device
        index_dtype = torch.int32 if max(num_nodes, src.numel()) <= INT32_MAX else torch.int64
        indptr = _indptr_from_counts(torch.bincount(dst, minlength=num_nodes))
        csc_order = torch.argsort(src, stable=True)
        csc_indptr = _indptr_from_counts(torch.bincount(src, minlength=num_nodes))
        return cls(num_nodes, indptr.to(device), src.to(index_dtype),
                   edge_perm, csc_indptr.to(device), dst[csc_order].to(index_dtype),
                   csc_order.to(index_dtype))

    def edge_index(self):
        """int64 ``[2, E]`` edges in construction order (the order per-edge tensors use)."""
        dst = torch.repeat_interleave(torch.arange(self.num_nodes, device=self.device),
                                      self.indptr.diff())
        pairs = torch.stack([self.indices.long(), dst])
        if self.edge_perm is None:
            return pairs
        out = torch.empty_like(pairs)
        out[:, self.edge_perm] = pairs
        return out

    def to(self, device):
        """The same graph on `device` (self if already there)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device == self.device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Graph(self.num_nodes, move(self.indptr), move(self.indices), move(self.edge_perm),
                     move(self.csc_indptr), move(self.csc_indices), move(self.csc_edge_ids))

    def coalesce(self):
        """A new Graph with each (source, destination) pair once, in CSR order (by destination,
        then source). Per-edge tensors of this graph do not carry over: the new graph's edges
        are numbered in its CSR order."""
        key = torch.stack([self.indices.long(),
                           torch.repeat_interleave(torch.arange(self.num_nodes, device=self.device),
                                                   self.indptr.diff())])
        pairs = torch.unique(key.flip(0), dim=1).flip(0)  # sorted by (destination, source)
        graph = Graph._from_sorted(self.num_nodes, pairs[0], pairs[1], None)
        graph._coalesced = True
        return graph

    def is_coalesced(self):
        """True when no (source, destination) pair occurs twice. One host sync, then cached."""
        if self._coalesced is None:
            dst = torch.repeat_interleave(torch.arange(self.num_nodes, device=self.device),
                                          self.indptr.diff())
            keys = torch.sort(dst * self.num_nodes + self.indices.long()).values
            self._coalesced = not bool((keys[1:] == keys[:-1]).any())
        return self._coalesced

    def add_self_loops(self):
        """A new Graph with an edge i -> i appended for every node (after the existing edges, in
        construction order: per-edge tensors of the new graph are [E + N], the loops last)."""
        loops = torch.arange(self.num_nodes, device=self.device).expand(2, -1)
        return Graph.from_edge_index(torch.cat([self.edge_index(), loops], dim=1), self.num_nodes)


    def khop(self, k):
        """A new Graph of the k-hop adjacency (edge j -> i wherever a path of 1 to k edges
        leads from j to i), coalesced. Per-edge tensors do not carry over."""
        from .graph_order import khop

        return Graph.from_edge_index(khop(self.edge_index(), k, self.num_nodes), self.num_nodes)

    def reorder(self, method="rcm", pos=None):
        """Renumbers the nodes in a locality-preserving order; returns ``(graph, perm)``.

        method "rcm": reverse Cuthill-McKee on the graph; "morton": Z-order of the node
        coordinates ``pos`` (float ``[N, 2 or 3]``). ``perm[p]`` is the old id of new node p:
        reorder node tensors with ``x[perm]``. The new graph keeps this graph's edge order
        (per-edge tensors carry over unchanged)."""
        from .graph_order import morton_order, rcm_order

        V.check_choice("method", method, ("rcm", "morton"))
        if method == "morton":
            if pos is None:
                raise ValueError('method="morton" needs pos, the node coordinates [N, 2 or 3]')
            V.check_shape("pos", pos, (self.num_nodes, pos.shape[-1]), "N, 2 or 3")
            perm = morton_order(pos)
        else:
            perm = rcm_order(self.indptr, self.indices, self.num_nodes)
        new_id = torch.empty_like(perm)
        new_id[perm] = torch.arange(self.num_nodes, device=perm.device)
        return Graph.from_edge_index(new_id[self.edge_index()], self.num_nodes), perm


def _indptr_from_counts(counts):
    indptr = counts.new_zeros(counts.numel() + 1)
    torch.cumsum(counts, 0, out=indptr[1:])
    return indptr


def _check_node_indices(name, index, num_nodes):
    """Checks 0 <= index < num_nodes (one host sync); returns num_nodes (default max + 1)."""
    if num_nodes is not None:
        V.check_int_range("num_nodes", num_nodes, 0, 2**62)
    if index.numel() == 0:
        return 0 if num_nodes is None else num_nodes
    low, high = (int(x) for x in torch.aminmax(index))
    if low < 0:
        raise ValueError(f"{name} has a negative node index ({low})")
    if num_nodes is None:
        return high + 1
    if high >= num_nodes:
        raise ValueError(f"{name} has node index {high} out of range for num_nodes = {num_nodes}")
    return num_nodes
