"""vector-quantize-pytorch's EMA training step, re-implemented faithfully in plain torch (the
package is not a dependency): `VectorQuantize` with its defaults (one Euclidean codebook, no
k-means init, no stochastic sampling, no dead-code expiry, commitment loss by MSE) except
``rotation_trick=False`` (see below), whose `EuclideanCodebook.forward` in training mode runs,
in fp32:

- dist = -cdist(x, embed), cdist = sqrt(clamp(|x|^2 + |c|^2 - 2 x.c, 0)) [1, N, K], kept
  until the end of the forward (the codebook returns it);
- embed_ind = dist.argmax(-1); embed_onehot = F.one_hot(embed_ind, K) as fp32 [1, N, K];
- quantize = einsum(one_hot, embed): the codes picked by a [N, K] x [K, D] matmul;
- EMA (cluster sizes start at 1, sums at the codebook): cluster_size.lerp_(one_hot.sum(1),
  1 - decay), embed_avg.lerp_(einsum(x, one_hot) [K, D], 1 - decay),
  embed = embed_avg / (Laplace-smoothed cluster_size * total);

then `VectorQuantize.forward`: the straight-through output x + (quantize - x).detach() and
loss = tensor([0.]) + mse_loss(quantize.detach(), x) * commitment_weight.

The package's default output is now the rotation trick (``rotation_trick=True``), a different
gradient estimator with the same forward value; the straight-through option is the one that
computes what gk.nn.VectorQuantizer computes. The rotation adds O(N D) elementwise work, small
beside the O(N K) and O(N K D) passes above.
"""
import torch
import torch.nn.functional as F


def library_cdist(x, codes):
    """The library's cdist: sqrt(clamp(|x|^2 + |c|^2 - 2 x.c, 0)) for [h, n, d], [h, c, d]."""
    x2 = (x ** 2).sum(-1)
    c2 = (codes ** 2).sum(-1)
    xc = torch.einsum("hid,hjd->hij", x, codes) * -2
    return (x2.unsqueeze(-1) + c2.unsqueeze(-2) + xc).clamp(min=0).sqrt()


def laplace_smoothing(counts, num_codes, eps):
    return (counts + eps) / (counts.sum(dim=-1, keepdim=True) + num_codes * eps)


class OneHotEMAQuantizer:
    """One codebook (h = 1) in training mode, as the library's defaults run it."""

    def __init__(self, codebook, decay=0.99, commitment=0.25, eps=1e-5):
        self.embed = codebook.detach().clone().float().unsqueeze(0)     # [1, K, D]
        self.embed_avg = self.embed.clone()
        self.cluster_size = torch.ones(self.embed.shape[:2], device=codebook.device)
        self.decay, self.commitment, self.eps = decay, commitment, eps

    def codebook_step(self, x):
        """EuclideanCodebook.forward (training): quantize [N, D], embed_ind [N], dist [1, N, K]."""
        flatten = x.float().unsqueeze(0)                                # [1, N, D]
        embed = self.embed.detach()
        dist = -library_cdist(flatten, embed)
        embed_ind = dist.argmax(dim=-1)
        embed_onehot = F.one_hot(embed_ind, self.embed.shape[1]).type(dist.dtype)  # [1, N, K]
        quantize = torch.einsum("hnc,hcd->hnd", embed_onehot, embed)
        with torch.no_grad():
            self.cluster_size.lerp_(embed_onehot.sum(dim=1), 1 - self.decay)
            embed_sum = torch.einsum("hnd,hnc->hcd", flatten, embed_onehot)
            self.embed_avg.lerp_(embed_sum, 1 - self.decay)
            num_codes = self.embed.shape[1]
            size = laplace_smoothing(self.cluster_size, num_codes, self.eps) \
                * self.cluster_size.sum(dim=-1, keepdim=True)
            self.embed.copy_(self.embed_avg / size.unsqueeze(-1))
        return quantize[0], embed_ind[0], dist

    def __call__(self, x):
        """VectorQuantize.forward (training): straight-through output [N, D], indices [N],
        commitment loss [1]."""
        quantize, embed_ind, _ = self.codebook_step(x)
        commit_quantize = quantize.detach()
        out = x + (quantize - x).detach()
        loss = torch.tensor([0.0], device=x.device, requires_grad=True)
        loss = loss + F.mse_loss(commit_quantize, x) * self.commitment
        return out, embed_ind, loss
