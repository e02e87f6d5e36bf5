"""gk.nn.VectorQuantizer against a dense cdist/argmin + one-hot reference with the same
parameters: indices, outputs, losses, gradients, EMA updates; usage statistics, dead-code
restart, the linear codebook transform, distillation, state_dict, compile, autocast."""
import copy

import pytest
import torch
import torch.nn.functional as F

import gtkernels as gk


def dense_quantize(vq, x):
    """Reference forward: cdist -> argmin per group, gather, the losses written out."""
    codebook = vq.grouped_codebook()                                   # [G, K, d]
    G, K, d = codebook.shape
    flat = x.reshape(-1, G, d)
    if vq.metric == "cosine":
        flat = F.normalize(flat, dim=-1)
    dist = torch.stack([torch.cdist(flat[:, g].detach(), codebook[g].detach()) for g in range(G)])
    idx = dist.argmin(-1).T                                             # [N, G]
    q = torch.stack([codebook[g][idx[:, g]] for g in range(G)], 1)
    loss = vq.commitment * ((flat - q.detach()) ** 2).mean()
    if vq.ema_decay is None:
        loss = loss + ((q - flat.detach()) ** 2).mean()
    quantized = flat + (q - flat).detach()
    lead = x.shape[:-1]
    return quantized.reshape(x.shape), idx.reshape(*lead, *([G] if G > 1 else [])), loss


def one_hot_ema_update(vq, x, idx):
    """Reference EMA step with one-hot [N, K] matrices: new (cluster_size, sums, codebook)."""
    G, K, d = vq.groups, vq.num_codes, vq.dim // vq.groups
    flat = x.reshape(-1, G, d)
    if vq.metric == "cosine":
        flat = F.normalize(flat, dim=-1)
    idx = idx.reshape(-1, G)
    decay, sizes, sums, codes = vq.ema_decay, [], [], []
    for g in range(G):
        one_hot = F.one_hot(idx[:, g], K).to(flat.dtype)
        size = decay * vq.cluster_size.view(G, K)[g] + (1 - decay) * one_hot.sum(0)
        total = decay * vq.ema_embed_sum.view(G, K, d)[g] + (1 - decay) * one_hot.T @ flat[:, g]
        smoothed = (size + vq.eps) / (size.sum() + K * vq.eps) * size.sum()
        sizes.append(size), sums.append(total), codes.append(total / smoothed[:, None])
    return torch.stack(sizes), torch.stack(sums), torch.stack(codes)


CONFIGS = [dict(), dict(metric="cosine"), dict(groups=2), dict(ema_decay=0.9),
           dict(ema_decay=0.8, metric="cosine", groups=4), dict(codebook_transform="linear"),
           dict(codebook_transform="linear", groups=2, metric="cosine")]


@pytest.mark.parametrize("config", CONFIGS,
                         ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_vq_matches_dense_reference(config):
    vq = gk.nn.VectorQuantizer(37, 16, dtype=torch.float64, commitment=0.3, **config).train()
    if config.get("codebook_transform"):
        with torch.no_grad():
            vq.transform_weight.add_(0.1 * torch.randn_like(vq.transform_weight))
    x = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    before = copy.deepcopy(vq)
    quantized, idx, loss = vq(x)
    ref_quantized, ref_idx, ref_loss = dense_quantize(before, x)
    assert idx.dtype == torch.int64 and torch.equal(idx, ref_idx)
    torch.testing.assert_close(quantized, ref_quantized)
    torch.testing.assert_close(loss, ref_loss)
    assert loss.dim() == 0
    # Gradients: straight-through for quantized, codebook/commitment terms for the loss.
    grad_out = torch.randn_like(x)
    learned = [p for p in before.parameters()]
    got = torch.autograd.grad((quantized * grad_out).sum() + loss, [x] + list(vq.parameters()))
    want = torch.autograd.grad((ref_quantized * grad_out).sum() + ref_loss, [x] + learned)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    if vq.ema_decay is not None:
        sizes, sums, codes = one_hot_ema_update(before, x.detach(), idx)
        torch.testing.assert_close(vq.cluster_size.view_as(sizes), sizes)
        torch.testing.assert_close(vq.ema_embed_sum.view_as(sums), sums)
        torch.testing.assert_close(vq.embedding.view_as(codes), codes)


def test_vq_straight_through_gradient_is_identity():
    vq = gk.nn.VectorQuantizer(64, 8, ema_decay=0.99).eval()
    x = torch.randn(50, 8, requires_grad=True)
    quantized, idx, loss = vq(x)
    grad_out = torch.randn_like(x)
    (grad,) = torch.autograd.grad(quantized, x, grad_out)
    assert torch.equal(grad, grad_out)
    torch.testing.assert_close(quantized.detach(), vq.codebook[idx])
    assert loss.dtype == torch.float32


def test_vq_eval_mode_leaves_codebook_and_ema_alone_but_counts_usage():
    vq = gk.nn.VectorQuantizer(16, 8, ema_decay=0.9, dead_code_threshold=0.5).eval()
    state = copy.deepcopy(vq.state_dict())
    _, idx, _ = vq(torch.randn(40, 8))
    for name in ("embedding", "ema_embed_sum", "cluster_size"):
        assert torch.equal(vq.state_dict()[name], state[name])
    assert torch.equal(vq.code_counts, torch.bincount(idx, minlength=16))


def test_vq_usage_statistics():
    vq = gk.nn.VectorQuantizer(8, 4, groups=1)
    assert vq.perplexity().item() == 0 and vq.usage_fraction().item() == 0
    vq.code_counts.copy_(torch.tensor([5, 5, 0, 5, 0, 0, 5, 0]))
    torch.testing.assert_close(vq.perplexity(), torch.tensor(4.0))
    assert vq.usage_fraction().item() == 0.5
    vq.reset_usage()
    assert vq.code_counts.sum() == 0
    grouped = gk.nn.VectorQuantizer(8, 8, groups=2)
    grouped(torch.randn(30, 8))
    assert grouped.perplexity().shape == (2,) and grouped.code_counts.sum() == 60


@pytest.mark.parametrize("ema_decay", [None, 0.9])
def test_vq_restart_dead_codes_from_the_batch(ema_decay):
    vq = gk.nn.VectorQuantizer(12, 8, ema_decay=ema_decay)
    dead = torch.arange(12) % 3 == 0
    with torch.no_grad():
        vq.cluster_size.copy_(torch.where(dead, 0.1, 2.0))
    before = vq.codebook.detach().clone()
    x = torch.randn(5, 8)
    vq.restart_dead_codes(x, threshold=1.0)
    after = vq.codebook.detach()
    assert torch.equal(after[~dead], before[~dead])
    for code in after[dead]:  # each restarted code is one of the batch's vectors
        assert (code == x).all(-1).any()
    assert torch.equal(vq.cluster_size[dead], torch.ones(int(dead.sum())))
    if ema_decay is not None:
        torch.testing.assert_close(vq.ema_embed_sum[dead], after[dead])


def test_vq_automatic_restart_in_training_revives_unused_codes():
    torch.manual_seed(0)
    vq = gk.nn.VectorQuantizer(256, 8, ema_decay=0.5, dead_code_threshold=0.05).train()
    with torch.no_grad():
        vq.embedding.mul_(100.0)  # far from the data: almost no code is ever chosen
        vq.ema_embed_sum.mul_(100.0)
    x = torch.randn(512, 8)
    for _ in range(30):
        vq(x)
    vq.reset_usage()
    vq(x)
    assert vq.usage_fraction().item() > 0.5


def test_vq_linear_transform_learns_w_with_a_frozen_base():
    vq = gk.nn.VectorQuantizer(32, 8, codebook_transform="linear")
    assert [n for n, _ in vq.named_parameters()] == ["transform_weight"]
    assert "base_codebook" in vq.state_dict()
    torch.testing.assert_close(vq.codebook, vq.base_codebook)  # W = I at init
    base = vq.base_codebook.clone()
    optimizer = torch.optim.SGD(vq.parameters(), lr=0.1)
    _, _, loss = vq(torch.randn(64, 8))
    loss.backward()
    optimizer.step()
    assert torch.equal(vq.base_codebook, base)
    torch.testing.assert_close(vq.codebook, base @ vq.transform_weight.detach().T)


@pytest.mark.parametrize("groups,metric", [(1, "l2"), (2, "cosine")])
def test_vq_distill_loss_matches_dense_kl(groups, metric):
    vq = gk.nn.VectorQuantizer(20, 8, groups=groups, metric=metric, soft_temperature=0.7,
                               dtype=torch.float64)
    student = torch.randn(9, 8, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(9, 8, dtype=torch.float64)
    loss = vq.distill_loss(student, teacher)
    codebook, d = vq.grouped_codebook(), 8 // groups
    want = 0
    for g in range(groups):
        s, t = (v[:, g * d:(g + 1) * d] for v in (student, teacher))
        if metric == "cosine":
            s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        if metric == "cosine":
            dist_s, dist_t = 1 - s @ codebook[g].T, 1 - t @ codebook[g].T
        else:
            dist_s, dist_t = torch.cdist(s, codebook[g]) ** 2, torch.cdist(t, codebook[g]) ** 2
        log_p_s, log_p_t = (-dist_s / 0.7).log_softmax(-1), (-dist_t / 0.7).log_softmax(-1)
        want = want + (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean() / groups
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_vq_state_dict_round_trip():
    vq = gk.nn.VectorQuantizer(24, 8, ema_decay=0.9, groups=2).train()
    for _ in range(3):
        vq(torch.randn(30, 8))
    clone = gk.nn.VectorQuantizer(24, 8, ema_decay=0.9, groups=2).train()
    clone.load_state_dict(vq.state_dict())
    for name, value in vq.state_dict().items():
        assert torch.equal(clone.state_dict()[name], value), name
    x = torch.randn(17, 8)
    for a, b in zip(vq(x), clone(x)):
        assert torch.equal(a, b)
    assert torch.equal(vq.embedding, clone.embedding)


@pytest.mark.parametrize("config", [dict(), dict(ema_decay=0.9, groups=2),
                                    dict(codebook_transform="linear", metric="cosine")])
def test_vq_compiles_without_graph_break(config):
    vq = gk.nn.VectorQuantizer(40, 8, **config).train()
    twin = copy.deepcopy(vq)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 13, 8, requires_grad=True)
    got, want = compiled(x), vq(x)
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[2], want[2])
    for name, value in vq.state_dict().items():  # EMA updates happened inside the graph
        torch.testing.assert_close(twin.state_dict()[name], value)
    g_got = torch.autograd.grad(got[0].sum() + got[2], x)
    g_want = torch.autograd.grad(want[0].sum() + want[2], x)
    torch.testing.assert_close(g_got, g_want)


@pytest.mark.parametrize("config", [dict(), dict(ema_decay=0.9), dict(codebook_transform="linear")])
def test_vq_autocast_bf16_cpu(config):
    vq = gk.nn.VectorQuantizer(64, 16, **config).train()
    encoder = torch.nn.Linear(16, 16)
    x = torch.randn(40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = encoder(x)
        quantized, idx, loss = vq(z)
        total = quantized.float().square().mean() + loss
    assert quantized.dtype == torch.bfloat16 and idx.shape == (40,)
    total.backward()
    assert torch.isfinite(total) and torch.isfinite(encoder.weight.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in vq.parameters())


def test_vq_same_indices_and_loss_as_vector_quantize_pytorch():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    ours = gk.nn.VectorQuantizer(32, 16, ema_decay=0.9, commitment=0.25).train()
    theirs = vqp.VectorQuantize(dim=16, codebook_size=32, decay=0.9, commitment_weight=0.25,
                                kmeans_init=False).train()
    with torch.no_grad():
        theirs._codebook.embed.copy_(ours.codebook.unsqueeze(0))
    x = torch.randn(2, 50, 16)
    quantized, idx, loss = ours(x)
    their_quantized, their_idx, their_loss = theirs(x)
    assert torch.equal(idx, their_idx)
    torch.testing.assert_close(quantized, their_quantized)
    torch.testing.assert_close(loss, their_loss.reshape(()))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_codes=8, dim=10, groups=3), ValueError, r"dim \(10\) must be divisible by groups"),
    (dict(num_codes=8, dim=6, groups=2), ValueError, r"dim / groups must be in \[4, 1024\]"),
    (dict(num_codes=8, dim=8, metric="ip"), ValueError, "metric must be one of"),
    (dict(num_codes=8, dim=8, ema_decay=1.0), ValueError, r"ema_decay must be in \(0, 1\)"),
    (dict(num_codes=8, dim=8, ema_decay=0.9, codebook_transform="linear"), ValueError,
     "exclude each other"),
    (dict(num_codes=8, dim=8, codebook_transform="mlp"), ValueError, "codebook_transform must"),
    (dict(num_codes=0, dim=8), ValueError, "num_codes must be in"),
    (dict(num_codes=8, dim=8, commitment=-1), ValueError, "commitment must be"),
])
def test_vq_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gk.nn.VectorQuantizer(**kwargs)


def test_vq_bad_calls():
    vq = gk.nn.VectorQuantizer(8, 8)
    with pytest.raises(ValueError, match=r"x's last dim must be dim = 8"):
        vq(torch.randn(3, 7))
    with pytest.raises(ValueError, match="soft_temperature"):
        vq.distill_loss(torch.randn(3, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="codebook_transform='linear'"):
        gk.nn.VectorQuantizer(8, 8, codebook_transform="linear").restart_dead_codes(
            torch.randn(4, 8), 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("config", [dict(ema_decay=0.9, groups=2), dict(metric="cosine"),
                                    dict(codebook_transform="linear")])
def test_vq_cuda_equals_cpu(config):
    vq = gk.nn.VectorQuantizer(1000, 64, **config).train()
    vq_cuda = copy.deepcopy(vq).cuda()
    x = torch.randn(4096, 64)
    quantized, idx, loss = vq(x)
    quantized_cuda, idx_cuda, loss_cuda = vq_cuda(x.cuda())
    assert torch.equal(idx_cuda.cpu(), idx)
    torch.testing.assert_close(quantized_cuda.cpu(), quantized)
    torch.testing.assert_close(loss_cuda.cpu(), loss)
    for name, value in vq.state_dict().items():  # EMA sums: fp32 atomics in another order
        torch.testing.assert_close(vq_cuda.state_dict()[name].cpu(), value, rtol=1e-4, atol=1e-5)
