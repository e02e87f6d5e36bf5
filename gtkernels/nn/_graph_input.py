"""What a graph layer accepts as its graph: a `Graph`, an ``edge_index`` tensor or a PyG
``Data``/``Batch`` (duck-typed), turned into a `Graph` (an edge_index on the features' device)."""
import torch

from ..graph import Graph


class GraphInputCache:
    """Remembers the `Graph` built from the last ``edge_index`` tensor seen.

    Building a Graph sorts the edges and validates them (host syncs), so a layer called again
    with the same tensor reuses the Graph. The key is the tensor itself (held, so its memory
    cannot be reused by another tensor) and its version counter (an in-place edit rebuilds).
    A stack of layers keeps one cache per layer: pass a prebuilt `Graph` to skip all of them.
    """

    def __init__(self):
        self._key = None
        self._graph = None

    def resolve(self, graph, num_nodes, device):
        """Returns ``(Graph on device, edge_attr carried by a PyG object or None)``."""
        if isinstance(graph, Graph):
            return graph, None  # on another device: graph_attention says so (no hidden copies)
        if isinstance(graph, torch.Tensor):
            return self._from_edge_index(graph, num_nodes, device), None
        if hasattr(graph, "edge_index") and hasattr(graph, "num_nodes"):
            data_nodes = int(graph.num_nodes)
            if data_nodes != num_nodes:
                raise ValueError(f"graph.num_nodes = {data_nodes} but x has {num_nodes} rows")
            return (self._from_edge_index(graph.edge_index, num_nodes, device),
                    getattr(graph, "edge_attr", None))
        raise TypeError("graph must be a gtkernels.Graph, an edge_index tensor [2, E] or an "
                        "object with .edge_index and .num_nodes (PyG Data), got "
                        f"{type(graph).__name__}")

    def _from_edge_index(self, edge_index, num_nodes, device):
        key = (edge_index, edge_index._version, num_nodes, torch.device(device))
        cached = self._key
        if cached is not None and cached[0] is key[0] and cached[1:] == key[1:]:
            return self._graph
        graph = Graph.from_edge_index(edge_index.to(device), num_nodes=num_nodes)
        self._key, self._graph = key, graph
        return graph


def edge_endpoints(g):
    """int64 ``(src [E], dst [E])`` of `g`'s edges in construction order (the order of
    per-edge tensors), without a host sync."""
    counts = g.indptr.diff()
    dst = torch.repeat_interleave(torch.arange(g.num_nodes, device=g.device), counts,
                                  output_size=g.num_edges)
    src = g.indices.long()
    if g.edge_perm is None:
        return src, dst
    return (torch.empty_like(src).index_copy_(0, g.edge_perm, src),
            torch.empty_like(dst).index_copy_(0, g.edge_perm, dst))
