"""Learn a PDE on a mesh with an encode-process-decode graph transformer.

A grid mesh (2D at the small CPU size, 3D at the GPU sizes; 2 * ndim neighbours + self-loops,
lexicographic node order, as in BENCH.md) carries advection-diffusion of a scalar u:

    u_i(t+1) = u_i(t) + sum_{j ~ i} w_ij (u_j(t) - u_i(t)),   w_ij = kappa + max(0, c . (x_i - x_j))

(diffusion plus upwind advection with velocity c; no flux through the boundary). A model of
pre-norm `gk.nn.GraphTransformerLayer`s learns u(t) -> u(t+1) - u(t); node inputs are u, the
grid coordinates with period-4 Fourier features (so that attention scores can tell neighbour
directions apart) and a random-walk structural encoding (which marks the boundary).

    python examples/mesh_diffusion.py                                  # CPU, 24 x 24 mesh
    python examples/mesh_diffusion.py --device cuda --size mesh300k    # 67^3 mesh, bf16
    python examples/mesh_diffusion.py --device cuda --size mesh300k --baseline segment-softmax
    python examples/mesh_diffusion.py --device cuda --size mesh10m    # 216^3, layers recomputed
    python examples/mesh_diffusion.py --edge-features   # edge offsets + edge stream instead

With ``--edge-features`` the inputs are translation invariant: edge offsets enter attention
(added to k and v) and an edge stream, and the coordinate features are dropped.

Prints the loss on a fixed batch before and after training, the rollout error, the time per
training step, and saves a PNG of prediction vs truth.
"""
import argparse
import math
import os
import sys
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import gtkernels as gk  # noqa: E402
from gtkernels.reference.graph_attn import segment_softmax_attention  # noqa: E402

SIZES = {
    "small": dict(shape=(24, 24), layers=3, dim=32, heads=4, batch=8, steps=600, lr=3e-3,
                  trajectories=12, horizon=30),
    "mesh300k": dict(shape=(67, 67, 67), layers=4, dim=128, heads=4, batch=1, steps=300,
                     lr=1e-3, trajectories=3, horizon=20),
    "mesh10m": dict(shape=(216, 216, 216), layers=4, dim=128, heads=4, batch=1, steps=20,
                    lr=1e-3, trajectories=2, horizon=4, checkpoint=True),
}
KAPPA, VELOCITY = 0.1, (0.3, 0.15, 0.1)
RWSE_STEPS = 3


def grid_mesh(shape, device):
    """Edges (j -> i, each neighbour pair both ways, plus self-loops) and integer coordinates
    [N, ndim] of a lexicographically ordered grid."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(s, device=device) for s in shape],
                                        indexing="ij"), -1).reshape(-1, len(shape))
    node = torch.arange(coords.shape[0], device=device).view(shape)
    edges = [torch.stack([node.flatten(), node.flatten()])]
    for axis in range(len(shape)):
        low = node.narrow(axis, 0, shape[axis] - 1).flatten()
        high = node.narrow(axis, 1, shape[axis] - 1).flatten()
        edges += [torch.stack([low, high]), torch.stack([high, low])]
    return torch.cat(edges, 1), coords


def pde_weights(edge_index, coords):
    """w_ij of every edge j -> i (0 on self-loops)."""
    src, dst = edge_index
    offset = (coords[dst] - coords[src]).float()  # x_i - x_j
    velocity = torch.tensor(VELOCITY[:coords.shape[1]], device=coords.device)
    weight = KAPPA + (offset * velocity).sum(1).clamp(min=0)
    return torch.where(src == dst, 0.0, weight)


def simulate(u0, edge_index, weights, horizon):
    """u0 [B, N] -> trajectory [B, horizon + 1, N]."""
    src, dst = edge_index
    states = [u0]
    for _ in range(horizon):
        u = states[-1]
        flux = weights * (u[:, src] - u[:, dst])
        states.append(u + torch.zeros_like(u).index_add_(1, dst, flux))
    return torch.stack(states, 1)


def random_initial_states(count, coords, shape, generator):
    """Sums of 4 Gaussian bumps of random sign, centre and width, scaled to max |u| = 1:
    [count, N]."""
    size = torch.tensor(shape, dtype=torch.float32)
    centres = torch.rand(count, 4, len(shape), generator=generator) * size
    widths = 1.5 + torch.rand(count, 4, 1, generator=generator) * size.min() / 6
    amps = torch.randn(count, 4, generator=generator)
    u = []
    for c, w, a in zip(centres, widths, amps):  # one state at a time: N can be 10M
        c, w = c.to(coords.device), w.to(coords.device)
        dist2 = ((coords[:, None].float() - c) ** 2 / w ** 2).sum(-1)
        bumps = (a.to(coords.device) * torch.exp(-0.5 * dist2)).sum(1)
        u.append(bumps / bumps.abs().max())
    return torch.stack(u)


def node_features(coords, shape, graph):
    """Static inputs [N, 3 * ndim + RWSE_STEPS]: coordinates in [-1, 1], period-4 Fourier
    features per axis, RWSE."""
    size = torch.tensor(shape, device=coords.device)
    scaled = 2 * coords / (size - 1) - 1
    phase = coords * (math.pi / 2)
    rwse = gk.nn.random_walk_se(graph, RWSE_STEPS).to(coords.device)
    return torch.cat([scaled, phase.sin(), phase.cos(), rwse], 1).float()


class MeshTransformer(nn.Module):
    """Encode (MLP) - process (pre-norm graph transformer layers) - decode (norm + linear)."""

    def __init__(self, in_dim, dim, heads, layers, edge_in=None, edge_dim=16, checkpoint=False):
        super().__init__()
        self.checkpoint = checkpoint  # recompute each layer in the backward (mesh10m memory)
        self.encode = _mlp(in_dim, dim)
        self.encode_edges = None if edge_in is None else _mlp(edge_in, edge_dim)
        self.process = nn.ModuleList(
            gk.nn.GraphTransformerLayer(dim, heads, pre_norm=True,
                                        edge_dim=None if edge_in is None else edge_dim)
            for _ in range(layers))
        self.decode = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 1))

    def forward(self, x, graph, edge_attr=None):
        h = self.encode(x)
        e = None if self.encode_edges is None else self.encode_edges(edge_attr)
        for layer in self.process:
            if self.checkpoint and torch.is_grad_enabled():
                out = checkpoint(layer, h, graph, e, use_reentrant=False)
            else:
                out = layer(h, graph, e)
            h, e = out if e is not None else (out, None)
        return self.decode(h).squeeze(-1)


def _mlp(in_dim, out_dim):
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Linear(out_dim, out_dim))


def edge_features(edge_index, coords):
    """[E, ndim + 1]: the offset x_j - x_i of each edge j -> i and a self-loop flag."""
    src, dst = edge_index
    return torch.cat([(coords[src] - coords[dst]).float(), (src == dst).float()[:, None]], 1)


def use_segment_softmax(model):
    """Swaps every layer's fused attention for the pure-torch segment softmax (PyG's core),
    which reads an edge_index: the one of each Graph seen is kept, as a PyG user holds it."""
    edge_indices = {}

    def attention(q, k, v, g, *, edge_attr=None, window=0, dilation=1, global_nodes=None):
        if window or global_nodes is not None:
            raise NotImplementedError("the segment-softmax baseline has no window or globals")
        if id(g) not in edge_indices:
            edge_indices[id(g)] = (g, g.edge_index())  # g held: its id stays unique
        return segment_softmax_attention(q, k, v, edge_indices[id(g)][1], edge_attr=edge_attr)

    for module in model.modules():
        if isinstance(module, gk.nn.GraphAttention):
            module.attention_fn = attention


def batched(edge_index, n, batch):
    """Edges of `batch` disjoint copies of an n-node graph."""
    copies = torch.arange(batch, device=edge_index.device)
    offsets = copies.repeat_interleave(edge_index.shape[1]) * n
    return edge_index.repeat(1, batch) + offsets


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=SIZES, default="small")
    parser.add_argument("--steps", type=int, help="training steps (default: per size)")
    parser.add_argument("--baseline", choices=["segment-softmax"], help="swap the attention")
    parser.add_argument("--png", default="mesh_diffusion.png")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edge-features", action="store_true",
                        help="edge offsets through the attention and an edge stream, instead of "
                             "coordinate features")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (the small size gains nothing from more, and "
                             "OpenMP threads contend badly on a busy machine)")
    args = parser.parse_args()
    cfg = SIZES[args.size]
    steps = args.steps or cfg["steps"]
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    shape, batch = cfg["shape"], cfg["batch"]
    amp = device.type == "cuda"
    start = time.perf_counter()

    edge_index, coords = grid_mesh(shape, device)
    n = coords.shape[0]
    weights = pde_weights(edge_index, coords)
    trajectories = simulate(random_initial_states(cfg["trajectories"] + 1, coords, shape, gen),
                            edge_index, weights, cfg["horizon"])
    train, held_out = trajectories[:-1], trajectories[-1]
    deltas = train[:, 1:] - train[:, :-1]
    delta_std = deltas.std()
    graph = gk.Graph.from_edge_index(batched(edge_index, n, batch), n * batch)
    static = node_features(coords, shape, gk.Graph.from_edge_index(edge_index, n))
    print(f"mesh {'x'.join(map(str, shape))}: {n:,} nodes, {edge_index.shape[1]:,} edges; "
          f"batch {batch}; data ready in {time.perf_counter() - start:.1f} s", flush=True)

    edges = edge_features(edge_index, coords) if args.edge_features else None
    if args.edge_features:  # translation invariant: offsets on edges replace coordinates
        static = static[:, -RWSE_STEPS:]
    model = MeshTransformer(static.shape[1] + 1, cfg["dim"], cfg["heads"], cfg["layers"],
                            None if edges is None else edges.shape[1],
                            checkpoint=cfg.get("checkpoint", False)).to(device)
    edges_batch = None if edges is None else edges.repeat(batch, 1)
    if args.baseline:
        use_segment_softmax(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg["lr"], total_steps=steps,
                                                   pct_start=0.1)
    static_batch = static.repeat(batch, 1)

    def sample(index):
        traj, t = index % train.shape[0], (index // train.shape[0]) % cfg["horizon"]
        return train[traj, t], deltas[traj, t]

    def batch_of(indices):
        states, targets = zip(*(sample(int(i)) for i in indices))
        return torch.cat(states), torch.cat(targets) / delta_std

    def loss_on(u, target):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            pred = model(torch.cat([u[:, None], static_batch], 1), graph, edges_batch)
        return (pred.float() - target).square().mean()

    fixed = batch_of(torch.randint(0, 1 << 30, (batch,), generator=gen))
    with torch.no_grad():
        initial = loss_on(*fixed).item()
    print(f"loss on a fixed batch before training: {initial:.4f}", flush=True)
    step_times = []
    for step in range(1, steps + 1):
        u, target = batch_of(torch.randint(0, 1 << 30, (batch,), generator=gen))
        tic = time.perf_counter()
        loss = loss_on(u, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - tic)
        if step % max(1, steps // 10) == 0 or step == 1:
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  "
                  f"{time.perf_counter() - start:6.1f} s", flush=True)
    with torch.no_grad():
        final = loss_on(*fixed).item()
    warm = sorted(step_times[len(step_times) // 5:])  # the first fifth is warm-up
    ms = 1000 * warm[len(warm) // 2]
    print(f"loss on the fixed batch: {initial:.4f} -> {final:.4f} ({initial / final:.1f}x lower)")
    print(f"training step (forward + backward + optimizer): median {ms:.2f} ms"
          + (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if amp else ""))
    rollout(model, held_out, static, edges, edge_index, n, delta_std, amp, device, args.png,
            shape)
    print(f"total {time.perf_counter() - start:.1f} s")


@torch.no_grad()
def rollout(model, truth, static, edges, edge_index, n, delta_std, amp, device, png, shape):
    """Rolls the model out from the held-out trajectory's first state; prints the relative L2
    error along the way and plots the last state."""
    graph = gk.Graph.from_edge_index(edge_index, n)
    u = truth[0]
    horizon = truth.shape[0] - 1
    errors = []
    for t in range(1, horizon + 1):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            delta = model(torch.cat([u[:, None], static], 1), graph, edges).float()
        u = u + delta * delta_std
        errors.append(((u - truth[t]).norm() / truth[t].norm()).item())
    marks = sorted({1, max(1, horizon // 2), horizon})
    print("rollout relative L2 error: "
          + ", ".join(f"step {t}: {errors[t - 1]:.4f}" for t in marks))
    save_plot(u, truth[horizon], shape, png, horizon)


def save_plot(pred, truth, shape, path, horizon):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def image(u):  # the middle slice of a 3D mesh
        u = u.float().cpu().view(shape)
        return u[shape[0] // 2] if len(shape) == 3 else u

    panels = [("truth", image(truth)), ("prediction", image(pred)),
              ("prediction - truth", image(pred) - image(truth))]
    limit = float(panels[0][1].abs().max())  # one colour scale for all three panels
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, (title, img) in zip(axes, panels):
        shown = ax.imshow(img.numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.set_title(f"{title}, rollout step {horizon}")
        fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
