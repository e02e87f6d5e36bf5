"""vector-quantize-pytorch's EuclideanCodebook EMA step, re-implemented faithfully in plain
torch (the package is not a dependency): cdist from x^2 + c^2 - 2 x c, argmax of -dist,
F.one_hot [N, K], the EMA cluster sizes as one_hot.sum(0) and the EMA sums as one_hot.T @ x,
Laplace smoothing, and VectorQuantize's commitment loss and straight-through output."""
import torch
import torch.nn.functional as F


def library_cdist(x, codes):
    """The library's cdist: sqrt(clamp(|x|^2 + |c|^2 - 2 x.c, 0)) for [h, n, d], [h, c, d]."""
    x2 = (x ** 2).sum(-1)
    c2 = (codes ** 2).sum(-1)
    xc = torch.einsum("hid,hjd->hij", x, codes) * -2
    return (x2.unsqueeze(-1) + c2.unsqueeze(-2) + xc).clamp(min=0).sqrt()


class OneHotEMAQuantizer:
    """One codebook (h = 1), EMA updates in training, as the library's defaults do them."""

    def __init__(self, codebook, decay=0.99, commitment=0.25, eps=1e-5):
        self.embed = codebook.detach().clone().unsqueeze(0)            # [1, K, D]
        self.embed_avg = self.embed.clone()
        self.cluster_size = torch.zeros(self.embed.shape[:2], device=codebook.device)
        self.decay, self.commitment, self.eps = decay, commitment, eps

    def __call__(self, x):
        flatten = x.unsqueeze(0)                                        # [1, N, D]
        dist = -library_cdist(flatten, self.embed)
        embed_ind = dist.argmax(dim=-1)
        del dist
        embed_onehot = F.one_hot(embed_ind, self.embed.shape[1]).type(x.dtype)  # [1, N, K]
        quantize = F.embedding(embed_ind[0], self.embed[0]).unsqueeze(0)
        with torch.no_grad():
            self.cluster_size.mul_(self.decay).add_(embed_onehot.sum(dim=1), alpha=1 - self.decay)
            embed_sum = torch.einsum("hnd,hnc->hcd", flatten, embed_onehot)
            self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
            total = self.cluster_size.sum(dim=-1, keepdim=True)
            smoothed = (self.cluster_size + self.eps) / (total + self.embed.shape[1] * self.eps)
            self.embed.copy_(self.embed_avg / (smoothed * total).unsqueeze(-1))
        del embed_onehot
        quantize = quantize[0]
        loss = F.mse_loss(quantize.detach(), x) * self.commitment
        return x + (quantize - x).detach(), embed_ind[0], loss
