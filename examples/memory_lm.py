"""A tiny character-level transformer language model whose projections are MemoryLayers
(MemoryFormer): Q/K/V through one shared hash, the attention output and both MLP layers as
hashed lookups. Trained on addition strings generated here ("417+85=502;"), it prints the
training loss and the held-out loss before and after training.

    python examples/memory_lm.py                 # CPU by default when no GPU, ~1 minute
    python examples/memory_lm.py --steps 600 --device cuda
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import gtkernels as gk

VOCAB = "0123456789+=;"


def addition_corpus(num_sums: int, generator: torch.Generator) -> torch.Tensor:
    """A stream of 'a+b=c;' strings with a, b < 1000, as int64 token ids."""
    a = torch.randint(0, 1000, (num_sums,), generator=generator).tolist()
    b = torch.randint(0, 1000, (num_sums,), generator=generator).tolist()
    text = "".join(f"{x}+{y}={x + y};" for x, y in zip(a, b))
    return torch.tensor([VOCAB.index(c) for c in text], dtype=torch.long)


class MemoryBlock(nn.Module):
    """Pre-norm transformer block with every projection a MemoryLayer."""

    def __init__(self, dim: int, heads: int, tau: int):
        super().__init__()
        self.heads = heads
        self.norm_attn, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = gk.nn.MemoryLayer(dim, dim, tau=tau, num_projections=3)  # one shared hash
        self.out = gk.nn.MemoryLayer(dim, dim, tau=tau)
        self.mlp_in = gk.nn.MemoryLayer(dim, 4 * dim, tau=tau)
        self.mlp_out = gk.nn.MemoryLayer(4 * dim, dim, tau=tau)
        self.mlp_norm = nn.LayerNorm(4 * dim)  # the hash wants centred inputs

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2)
                   for t in self.qkv(self.norm_attn(x)))
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(attn.transpose(1, 2).reshape(batch, length, dim))
        return x + self.mlp_out(self.mlp_norm(F.gelu(self.mlp_in(self.norm_mlp(x)))))


class MemoryLM(nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, context: int, tau: int):
        super().__init__()
        self.token = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(MemoryBlock(dim, heads, tau) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.token(tokens) + self.position.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batches(stream, batch, context, generator):
    starts = torch.randint(0, stream.numel() - context - 1, (batch,), generator=generator)
    window = starts[:, None] + torch.arange(context + 1)
    chunk = stream[window]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def held_out_loss(model, stream, context, device):
    tokens = stream[: (stream.numel() - 1) // context * context + 1]
    inputs = tokens[:-1].view(-1, context).to(device)
    targets = tokens[1:].view(-1, context).to(device)
    model.eval()
    loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten()).item()
    model.train()
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tau", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_stream = addition_corpus(20000, generator)
    test_stream = addition_corpus(400, generator)
    model = MemoryLM(len(VOCAB), args.dim, 4, args.layers, args.context, args.tau).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    def warmup_cosine(step):
        return min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(train_stream):,} training characters, device {args.device}")
    start_eval = held_out_loss(model, test_stream, args.context, args.device)
    print(f"held-out loss before training: {start_eval:.3f} (uniform: {math.log(len(VOCAB)):.3f})")
    began, window, first = time.time(), [], None
    for step in range(1, args.steps + 1):
        inputs, targets = (t.to(args.device) for t in
                           batches(train_stream, args.batch, args.context, generator))
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if step % 50 == 0 or step == args.steps:
            mean = sum(window) / len(window)
            first = mean if first is None else first
            print(f"step {step:5d}  train loss {mean:.3f}  ({time.time() - began:.0f} s)")
            window = []
    end_eval = held_out_loss(model, test_stream, args.context, args.device)
    print(f"train loss (mean of a logging window of up to 50 steps): first {first:.3f} -> "
          f"last {mean:.3f}")
    print(f"held-out loss: {start_eval:.3f} -> {end_eval:.3f}")


if __name__ == "__main__":
    main()
