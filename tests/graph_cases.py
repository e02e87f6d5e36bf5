"""Random graphs and attention inputs shared by the graph tests."""
import torch


def random_edge_index(num_nodes, num_edges, *, hub_edges=0, isolated=0, device="cpu"):
    """int64 [2, E + hub_edges] in random order, with duplicates likely: sources uniform,
    destinations uniform over all but the last `isolated` nodes; node 0 gets `hub_edges` more."""
    dst_range = max(1, num_nodes - isolated)
    src = torch.randint(0, num_nodes, (num_edges + hub_edges,))
    dst = torch.cat([torch.randint(0, dst_range, (num_edges,)),
                     torch.zeros(hub_edges, dtype=torch.int64)])
    order = torch.randperm(src.numel())
    return torch.stack([src[order], dst[order]]).to(device)


def attention_inputs(num_nodes, num_edges, heads, dim, *, dtype=torch.float32, device="cpu",
                     bias=False, attr=False, requires_grad=False):
    """q, k, v [N, H, D] and optional edge_bias [E, H], edge_attr [E, H, D] (scaled down to
    keep scores of order 1)."""
    def make(*shape, scale=1.0):
        t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    q, k, v = (make(num_nodes, heads, dim) for _ in range(3))
    edge_bias = make(num_edges, heads) if bias else None
    edge_attr = make(num_edges, heads, dim, scale=0.5) if attr else None
    return q, k, v, edge_bias, edge_attr
