"""Graph-attention union family: BENCH.md's mesh-union (mesh300k adjacency + dilated window 32,
dilation 2 + 8 global nodes) against the FlexAttention union, with the adjacency alone and the
window alone (gk.window_attention, same window and 8 global tokens) shown for scale: the
acceptance is union <= adjacency alone + window alone.

Graph construction and coalescing happen in the factory, outside the timed region.
"""
import torch

import gtkernels as gk
from bench.core.registry import impl, problem
from bench.graph_attn import GRADS, attention_problem, grid_edge_index, max_rel_err
from bench.peers import graph_attn as peers

FAMILY = "graph_union"
WINDOW, DILATION, NUM_GLOBAL = 32, 2, 8


@problem(FAMILY, "mesh-union", grads=GRADS, compare=max_rel_err,
         note="67^3 grid (6-nbhd + self loops) + window 32, dilation 2 + 8 global nodes, "
              "H=4, D=32; the baselines attend other key sets (their check is not an error)")
def mesh_union(device, quick):
    side = 8 if quick else 67
    inputs = attention_problem(grid_edge_index(side, device), side**3, 4, 32, device)
    inputs["graph"] = inputs["graph"].coalesce()
    inputs["graph"].is_coalesced()  # the one-off check, outside the timed region
    inputs["edge_index"] = inputs["graph"].edge_index()
    inputs.update(window=WINDOW, dilation=DILATION,
                  global_nodes=torch.linspace(0, side**3 - 1, NUM_GLOBAL,
                                              device=device).long())
    return inputs


@impl(FAMILY, "gtkernels union", ours=True)
def gk_union(inputs):
    q, k, v, graph = (inputs[n] for n in ("q", "k", "v", "graph"))
    return lambda: gk.graph_attention(q, k, v, graph, window=inputs["window"],
                                      dilation=inputs["dilation"],
                                      global_nodes=inputs["global_nodes"])


@impl(FAMILY, "gtkernels adjacency alone", baseline=True)
def gk_adjacency(inputs):
    q, k, v, graph = (inputs[n] for n in ("q", "k", "v", "graph"))
    return lambda: gk.graph_attention(q, k, v, graph)


@impl(FAMILY, "gtkernels window alone (8 globals)", baseline=True)
def gk_window(inputs):
    q, k, v = (inputs[n] for n in ("q", "k", "v"))
    return lambda: gk.window_attention(q, k, v, inputs["window"], inputs["dilation"],
                                       num_global=inputs["global_nodes"].numel())


# Last: FlexAttention peers may hit device-side asserts that end the process.
impl(FAMILY, "FlexAttention union (tile bitmap | band | global)")(peers.flex_union)
