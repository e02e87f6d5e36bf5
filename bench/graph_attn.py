"""Graph-attention family: the mesh and power-law problems of BENCH.md, and the CPU grid20.

Graph construction (sorting, CSC) happens in the problem factories, outside the timed region.
Problems are bf16 on CUDA; on the CPU (--quick) they are fp32, the precision CPU users run.
"""
import torch

import gtkernels as gk
from bench.core.registry import impl, problem
from bench.peers import graph_attn as peers

FAMILY = "graph_attn"
GRADS = ("q", "k", "v")
MESHES = ["mesh300k", "mesh300k-wide", "mesh300k-shuffled"]


def max_rel_err(ours, peer):
    ours, peer = ours.float(), peer.float()
    return f"max rel err {float((ours - peer).abs().max() / peer.abs().max().clamp(min=1e-30)):.1e}"


def grid_edge_index(side, device):
    """3D grid side^3 in lexicographic order: 6-neighbourhood + self loops, [2, E] by dst."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(side, device=device)] * 3, indexing="ij"),
                         -1).reshape(-1, 3)
    offsets = torch.tensor([[0, 0, 0], [-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1],
                            [0, 0, 1]], device=device)
    neighbours = coords[:, None, :] + offsets[None, :, :]  # [N, 7, 3]
    inside = ((neighbours >= 0) & (neighbours < side)).all(-1)
    src = (neighbours[..., 0] * side + neighbours[..., 1]) * side + neighbours[..., 2]
    dst = torch.arange(coords.shape[0], device=device)[:, None].expand(-1, 7)
    return torch.stack([src[inside], dst[inside]])


def power_law_edge_index(num_nodes, num_edges, device, exponent=1.1, seed=0):
    """Destinations with probability ~ r^-exponent for node r-1 (r = 1..N), sources uniform."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = torch.arange(1, num_nodes + 1, device=device, dtype=torch.float64) ** -exponent
    cdf = torch.cumsum(weights, 0)
    u = torch.rand(num_edges, device=device, dtype=torch.float64, generator=gen) * cdf[-1]
    dst = torch.searchsorted(cdf, u).clamp(max=num_nodes - 1)
    src = torch.randint(0, num_nodes, (num_edges,), device=device, generator=gen)
    return torch.stack([src, dst])


def attention_problem(edge_index, num_nodes, heads, dim, device, dtype=None):
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    gen = torch.Generator(device=device).manual_seed(1)
    q, k, v = (torch.randn(num_nodes, heads, dim, device=device, dtype=dtype,
                           generator=gen).requires_grad_(True) for _ in range(3))
    graph = gk.Graph.from_edge_index(edge_index, num_nodes=num_nodes)
    return {"q": q, "k": k, "v": v, "graph": graph, "edge_index": graph.edge_index()}


def mesh(device, quick, heads=4, dim=32, shuffle=False):
    side = 8 if quick else 67
    edge_index = grid_edge_index(side, device)
    if shuffle:
        perm = torch.randperm(side**3, device=device,
                              generator=torch.Generator(device=device).manual_seed(2))
        edge_index = perm[edge_index]
    return attention_problem(edge_index, side**3, heads, dim, device)


@problem(FAMILY, "mesh300k", grads=GRADS, compare=max_rel_err,
         note="67^3 grid, 6-nbhd + self loops, 2,078,407 edges, H=4, D=32")
def mesh300k(device, quick):
    return mesh(device, quick)


@problem(FAMILY, "mesh300k-wide", grads=GRADS, compare=max_rel_err, note="H=8, D=64")
def mesh300k_wide(device, quick):
    return mesh(device, quick, heads=8, dim=64)


@problem(FAMILY, "mesh300k-shuffled", grads=GRADS, compare=max_rel_err,
         note="random node permutation")
def mesh300k_shuffled(device, quick):
    return mesh(device, quick, shuffle=True)


@problem(FAMILY, "mesh300k-rcm", grads=GRADS, compare=max_rel_err,
         note="mesh300k-shuffled renumbered by Graph.reorder('rcm') (reorder not timed)")
def mesh300k_rcm(device, quick):
    inputs = mesh(device, quick, shuffle=True)
    graph, _ = inputs["graph"].reorder("rcm")
    inputs.update(graph=graph, edge_index=graph.edge_index())
    return inputs


@problem(FAMILY, "powerlaw1m", grads=GRADS, compare=max_rel_err,
         note="1M nodes, 16M edges, dst ~ r^-1.1 (hub of ~2M in-edges), H=4, D=32")
def powerlaw1m(device, quick):
    n, e = (1000, 16000) if quick else (1000000, 16000000)
    return attention_problem(power_law_edge_index(n, e, device), n, 4, 32, device)


@problem(FAMILY, "mesh10m", grads=GRADS, compare=max_rel_err, note="216^3 grid, ~70M edges")
def mesh10m(device, quick):
    side = 10 if quick else 216
    return attention_problem(grid_edge_index(side, device), side**3, 4, 32, device)


@problem(FAMILY, "grid20", grads=GRADS, compare=max_rel_err,
         note="CPU acceptance: 20^3 grid, 6-nbhd + self loops, H=4, D=32, fp32")
def grid20(device, quick):
    return attention_problem(grid_edge_index(20, device), 20**3, 4, 32, device, torch.float32)


impl(FAMILY, "segment softmax (torch)")(peers.segment_softmax)
impl(FAMILY, "PyG TransformerConv")(peers.transformer_conv)
impl(FAMILY, "dense SDPA + mask", problems=MESHES)(peers.dense_sdpa)


@impl(FAMILY, "gtkernels", ours=True)
def gk_graph_attention(inputs):
    q, k, v, graph = (inputs[n] for n in ("q", "k", "v", "graph"))
    return lambda: gk.graph_attention(q, k, v, graph)


# Last: on the H200 this peer has hit a device-side assert inside the compiled FlexAttention
# kernel, which poisons the CUDA context for every later case of the process.
impl(FAMILY, "FlexAttention tile bitmap", problems=MESHES)(peers.flex_tile_bitmap)
