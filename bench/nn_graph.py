"""Graph-transformer training-step family ("graph_layer", issue 7): one AdamW step of a mesh
model built from `gk.nn.GraphTransformerLayer`, against the same model whose attention is the
segment-softmax peer of BENCH.md.

The model: a linear encoder of 16 node features, 4 pre-norm GraphTransformerLayers (dim 128,
4 heads, FFN 2x, LayerNorm: the mesh-transformer block) and a LayerNorm + linear decoder to one
value per node; loss = MSE to a random target. On CUDA it runs under bf16 autocast (fp32
parameters and AdamW state); on the CPU (--quick) in fp32. Both implementations start from
the same parameters and differ only in `GraphAttention.attention_fn`: `gk.graph_attention`
(ours) or the per-edge gather + segment softmax + scatter-add (PyG TransformerConv's core).

Problems (graphs as in bench/graph_attn.py): the 67^3 and 216^3 grids, 6-neighbourhood + self
loops. "fwd" is the model's forward; "fwd+bwd" one whole step (zero_grad, forward, loss,
backward, AdamW step); peak memory is that of one step beyond parameters, optimizer state and
inputs. The check compares the first forward's predictions (same parameters, before any step).
A baseline (shown, not a peer) runs the same model with the attention replaced by v: the time
of everything but the attention, which bounds the speedup any attention kernel can give.
`mesh10m-train-ckpt` recomputes each layer in the backward (activation checkpointing, as
examples/mesh_diffusion.py trains at mesh10m), for every implementation: without it the model
keeps about 12 KB of activations per node whatever the attention (bf16 autocast, counted with
saved-tensor hooks), ~120 GB at mesh10m, at the edge of the H200's 141 GB.
"""
import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gtkernels as gk
from bench.core.registry import TrainStep, impl, problem
from bench.graph_attn import grid_edge_index, max_rel_err
from bench.peers.graph_attn import segment_softmax_attention_fn

FAMILY = "graph_layer"
IN_FEATURES, DIM, HEADS, LAYERS = 16, 128, 4, 4
LEARNING_RATE = 1e-4


class MeshModel(nn.Module):
    """Encode (linear) - process (pre-norm graph transformer layers) - decode (norm + linear):
    x [N, in_features] -> [N]. With ``recompute``, each layer's activations are recomputed in
    the backward instead of kept."""

    def __init__(self, in_features, dim, heads, layers, recompute=False):
        super().__init__()
        self.recompute = recompute
        self.encode = nn.Linear(in_features, dim)
        self.process = nn.ModuleList(gk.nn.GraphTransformerLayer(dim, heads, pre_norm=True)
                                     for _ in range(layers))
        self.decode = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))

    def forward(self, x, graph):
        h = self.encode(x)
        for layer in self.process:
            if self.recompute and torch.is_grad_enabled():
                h = checkpoint(layer, h, graph, use_reentrant=False)
            else:
                h = layer(h, graph)
        return self.decode(h).squeeze(-1)


def mesh_train_problem(side, device, recompute=False):
    """Graph, features, target and the initial model (built on the CPU from a fixed seed, so
    that every implementation starts from the same parameters)."""
    gen = torch.Generator(device=device).manual_seed(3)
    num_nodes = side**3
    graph = gk.Graph.from_edge_index(grid_edge_index(side, device), num_nodes=num_nodes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MeshModel(IN_FEATURES, DIM, HEADS, LAYERS, recompute)
    return {"x": torch.randn(num_nodes, IN_FEATURES, device=device, generator=gen),
            "target": torch.randn(num_nodes, device=device, generator=gen),
            "graph": graph, "edge_index": graph.edge_index(), "model": model.to(device)}


def train_step(model, inputs):
    """TrainStep of `model` (a copy of the problem's model) on the problem's inputs."""
    x, target, graph = inputs["x"], inputs["target"], inputs["graph"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=x.is_cuda)

    def forward():
        with autocast:
            return model(x, graph)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward().float(), target)
        loss.backward()
        optimizer.step()
        return loss.detach()
    return TrainStep(forward, step)


NOTE = ("4 pre-norm GraphTransformerLayers, dim 128, 4 heads, bf16 autocast, AdamW; "
        "fwd+bwd = one whole train step")


@problem(FAMILY, "mesh300k-train", compare=max_rel_err, train_step=True,
         note="67^3 grid (300,763 nodes, 2,078,407 edges); " + NOTE)
def mesh300k_train(device, quick):
    return mesh_train_problem(6 if quick else 67, device)


@problem(FAMILY, "mesh10m-train", compare=max_rel_err, train_step=True,
         note="216^3 grid (10,077,696 nodes, ~70M edges); " + NOTE)
def mesh10m_train(device, quick):
    return mesh_train_problem(7 if quick else 216, device)


@problem(FAMILY, "mesh10m-train-ckpt", compare=max_rel_err, train_step=True,
         note="mesh10m-train with each layer recomputed in the backward (both models)")
def mesh10m_train_ckpt(device, quick):
    return mesh_train_problem(7 if quick else 216, device, recompute=True)


def with_attention(model, attention_fn):
    """A copy of `model` whose GraphAttention layers call `attention_fn`."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, gk.nn.GraphAttention):
            module.attention_fn = attention_fn
    return model


def values_only(q, k, v, g, **unused):
    """No attention: every node keeps its own value (the rest of the model's cost)."""
    return v


@impl(FAMILY, "segment softmax (torch)")
def segment_softmax_model(inputs):
    attention = segment_softmax_attention_fn(inputs["edge_index"])
    return train_step(with_attention(inputs["model"], attention), inputs)


@impl(FAMILY, "no attention (floor)", baseline=True)
def no_attention_model(inputs):
    """The floor of any attention kernel in this model: projections, norms, FFNs, optimizer."""
    return train_step(with_attention(inputs["model"], values_only), inputs)


@impl(FAMILY, "gk.graph_attention", ours=True)
def gk_model(inputs):
    return train_step(copy.deepcopy(inputs["model"]), inputs)
