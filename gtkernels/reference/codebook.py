"""References of the codebook family: dense N x K distances (float64 when given float64)."""
import torch

COSINE_EPS = 1e-8


def distances(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """x [N, D], codebook [K, D] -> [N, K] distances in x's dtype (l2 without cancellation).

    Elementwise products summed over D: every (row, code) pair takes the same arithmetic path,
    so duplicated codes get bitwise equal distances (a GEMM may treat edge columns apart)."""
    if metric == "l2":
        return (x[:, None, :] - codebook[None, :, :]).pow(2).sum(-1)
    ip = (x[:, None, :] * codebook[None, :, :]).sum(-1)
    if metric == "ip":
        return -ip
    x_norm = x.norm(dim=-1).clamp_min(COSINE_EPS)
    c_norm = codebook.norm(dim=-1).clamp_min(COSINE_EPS)
    return 1 - ip / (x_norm[:, None] * c_norm[None, :])


def codebook_search(x, codebook, k=1, metric="l2", chunk_elements=2**27):
    """Float64 distances, k smallest, ties to the lowest index. x [N, (G,) D] like gk's.
    Rows go in chunks of at most chunk_elements (rows x codes x D) to bound memory."""
    grouped = x.dim() == 3
    x3 = x if grouped else x.unsqueeze(1)
    cb3 = codebook if grouped else codebook.unsqueeze(0)
    rows = max(1, chunk_elements // (cb3.shape[1] * cb3.shape[2]))
    dists, idxs = [], []
    for g in range(cb3.shape[0]):
        d_parts, i_parts = [], []
        for start in range(0, x3.shape[0], rows):
            d = distances(x3[start:start + rows, g].double(), cb3[g].double(), metric)
            # A stable sort keeps equal distances in index order: ties to the lowest index.
            order = torch.sort(d, dim=1, stable=True).indices[:, :k]
            d_parts.append(torch.gather(d, 1, order))
            i_parts.append(order)
        dists.append(torch.cat(d_parts) if d_parts else x3.new_zeros((0, k), dtype=torch.float64))
        idxs.append(torch.cat(i_parts) if i_parts else x3.new_zeros((0, k), dtype=torch.int64))
    dist, idx = torch.stack(dists, 1), torch.stack(idxs, 1)
    return (dist, idx) if grouped else (dist.squeeze(1), idx.squeeze(1))


def code_distill_loss(student, teacher, codebook, temperature=1.0, metric="l2"):
    """Dense log_softmax + kl_div over all N x K logits."""
    log_q = torch.log_softmax(-distances(student, codebook, metric) / temperature, dim=-1)
    log_p = torch.log_softmax(-distances(teacher, codebook, metric) / temperature, dim=-1)
    return torch.nn.functional.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
