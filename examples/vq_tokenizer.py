"""A small VQ autoencoder ("image tokenizer") on procedurally generated 16x16 images with a
16,384-code codebook: EMA codebook updates and dead-code restarts from the batch keep the codes
in use. Prints the reconstruction loss and the fraction of codes used over each epoch.

    python examples/vq_tokenizer.py              # CPU by default when no GPU, ~35 s idle
    python examples/vq_tokenizer.py --steps 800 --device cuda
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import gtkernels as gk


def shape_images(count: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """[count, 1, size, size] in [0, 1]: a shaded background with a disc, a box and stripes
    at random places, sizes, orientations and intensities."""
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(count, *shape, 1, 1, generator=generator)

    coords = torch.arange(size, dtype=torch.float32)
    row, col = coords[:, None], coords[None, :]
    image = uniform(0.0, 0.4) + uniform(-0.02, 0.02) * row + uniform(-0.02, 0.02) * col
    disc = ((row - uniform(2, size - 2)) ** 2 + (col - uniform(2, size - 2)) ** 2
            < uniform(2, 5) ** 2)
    image = torch.where(disc, uniform(0.5, 1.0), image)
    top, left = uniform(0, size - 4), uniform(0, size - 4)
    box = (row >= top) & (row < top + uniform(3, 8)) & (col >= left) & (col < left + uniform(3, 8))
    image = torch.where(box, uniform(0.3, 0.9), image)
    angle = uniform(0, 3.1416)
    phase = torch.cos(angle) * row + torch.sin(angle) * col
    stripes = (torch.sin(phase * uniform(0.8, 2.0) + uniform(0, 6.3)) > 0.6) & (image < 0.45)
    image = torch.where(stripes, image + 0.25, image)
    return image.clamp(0, 1).unsqueeze(1)


class Tokenizer(nn.Module):
    """16x16 image -> 4x4 grid of latents -> quantized -> 16x16 image."""

    def __init__(self, dim: int, num_codes: int, ema_decay: float, dead_code_threshold: float):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.GELU(), nn.Conv2d(32, dim, 4, stride=2, padding=1))
        self.latent_norm = nn.LayerNorm(dim, elementwise_affine=False)  # codes keep their scale
        self.quantizer = gk.nn.VectorQuantizer(num_codes, dim, ema_decay=ema_decay,
                                               dead_code_threshold=dead_code_threshold)
        self.decoder = nn.Sequential(
            nn.ConvTranspose2d(dim, 32, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(16, 1, 3, padding=1))

    def encode(self, images):
        return self.latent_norm(self.encoder(images).permute(0, 2, 3, 1))  # [B, 4, 4, dim]

    def forward(self, images):
        quantized, codes, vq_loss = self.quantizer(self.encode(images))
        return self.decoder(quantized.permute(0, 3, 1, 2)), codes, vq_loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=288)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--images", type=int, default=8192, help="images per epoch")
    parser.add_argument("--codes", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data = shape_images(args.images, 16, generator).to(args.device)
    model = Tokenizer(args.dim, args.codes, ema_decay=0.9, dead_code_threshold=0.1)
    model = model.to(args.device)
    vq = model.quantizer
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    steps_per_epoch = args.images // args.batch
    latents = steps_per_epoch * args.batch * 16
    print(f"{args.images} images of 16x16 per epoch ({latents:,} latents), "
          f"{args.codes:,} codes of dim {args.dim}, device {args.device}")
    with torch.no_grad():  # start every code on a latent of the data
        vq.restart_dead_codes(model.encode(data[: args.batch * 4]), threshold=1.01)
    began, first = time.time(), None
    for step in range(args.steps):
        if step % steps_per_epoch == 0:
            order = torch.randperm(args.images, device=args.device)
            vq.reset_usage()
            epoch_loss = 0.0
        images = data[order[(step % steps_per_epoch) * args.batch:][: args.batch]]
        recon, _, vq_loss = model(images)
        recon_loss = F.mse_loss(recon, images)
        optimizer.zero_grad(set_to_none=True)
        (recon_loss + vq_loss).backward()
        optimizer.step()
        epoch_loss += recon_loss.item() / steps_per_epoch
        if (step + 1) % steps_per_epoch == 0:
            epoch = (step + 1) // steps_per_epoch
            first = epoch_loss if first is None else first
            print(f"epoch {epoch:3d}  recon loss {epoch_loss:.5f}  "
                  f"codebook usage {vq.usage_fraction().item():6.1%}  "
                  f"perplexity {vq.perplexity().item():8.0f}  ({time.time() - began:.0f} s)")
    print(f"reconstruction loss: first epoch {first:.5f} -> last epoch {epoch_loss:.5f}; "
          f"codebook usage over the last epoch {vq.usage_fraction().item():.1%}")


if __name__ == "__main__":
    main()
