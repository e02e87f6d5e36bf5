"""The bench's train-step problems at --quick sizes on the CPU: the graph_layer family (issue 7)
runs through the runner, its two models start equal, an out-of-memory case is a result, and
the vq_layer peer (vector-quantize-pytorch's one-hot EMA step) agrees with gk.nn.VectorQuantizer."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gtkernels as gk  # noqa: E402
from bench import nn_graph  # noqa: E402
from bench.core.registry import REGISTRY, Impl, Problem, TrainStep  # noqa: E402
from bench.core.runner import run_all, run_case  # noqa: E402
from bench.peers.vq import OneHotEMAQuantizer  # noqa: E402

FAST = {"warmup_ms": 1, "rep_ms": 1}


def graph_layer_impls():
    """(peer, ours) of the graph_layer family."""
    by_name = {i.name: i for i in REGISTRY.impls if i.family == nn_graph.FAMILY}
    return by_name["segment softmax (torch)"], by_name["gk.graph_attention"]


def test_graph_layer_problems_are_registered():
    names = {p.name for p, _ in REGISTRY.cases([nn_graph.FAMILY])}
    assert names == {"mesh300k-train", "mesh10m-train", "mesh10m-train-ckpt"}
    assert all(p.train_step for p, _ in REGISTRY.cases([nn_graph.FAMILY]))


def test_graph_layer_family_runs_quick_on_cpu():
    rows = run_all(REGISTRY, "cpu", True, families=[nn_graph.FAMILY],
                   problems=["mesh300k-train"], timing=FAST, log=lambda *a, **k: None)
    assert len(rows) == 3
    for row in rows:
        assert row["error"] is None, row
        assert row["train_step"] and row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0
    assert all(r["check"].startswith("max rel err") for r in rows if r["ours"])
    assert all(r["check"] == "" for r in rows if r["baseline"])


def test_graph_layer_models_agree_through_steps():
    """Same parameters: the same predictions and, step after step, the same losses."""
    inputs = nn_graph.mesh300k_train("cpu", True)
    peer, ours = (impl.build(inputs) for impl in graph_layer_impls())
    with torch.no_grad():
        torch.testing.assert_close(ours.forward(), peer.forward(), rtol=1e-4, atol=1e-5)
    for _ in range(3):
        torch.testing.assert_close(ours.step(), peer.step(), rtol=1e-4, atol=1e-6)


def test_recompute_does_not_change_the_step():
    plain = nn_graph.mesh10m_train("cpu", True)
    recomputed = nn_graph.mesh10m_train_ckpt("cpu", True)
    _, ours = graph_layer_impls()
    plain_step, recomputed_step = ours.build(plain).step, ours.build(recomputed).step
    for _ in range(2):
        torch.testing.assert_close(recomputed_step(), plain_step(), rtol=1e-5, atol=1e-6)


def test_out_of_memory_is_a_result_and_the_next_case_runs():
    problem = Problem("oom_check", "p", lambda device, quick: {}, train_step=True)

    def out_of_memory(inputs):
        def step():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26 GiB")
        return TrainStep(step, step)

    def fits(inputs):
        return TrainStep(lambda: torch.ones(3), lambda: torch.ones(()))

    rows = [run_case(problem, Impl("oom_check", name, build), {}, {}, "cpu", FAST)
            for name, build in (("peer", out_of_memory), ("ours", fits))]
    assert rows[0]["error"] == "out of memory" and rows[0]["fwd_ms"] is None
    assert rows[1]["error"] is None and rows[1]["fwd_bwd_ms"] > 0


def test_vq_peer_step_matches_gk_vector_quantizer():
    """The one-hot EMA step and the index-add EMA step are the same update: same indices,
    outputs, losses and codebooks over two steps."""
    gen = torch.Generator().manual_seed(5)
    codebook = torch.randn(48, 8, generator=gen)
    peer = OneHotEMAQuantizer(codebook, decay=0.9, commitment=0.25)
    vq = gk.nn.VectorQuantizer(48, 8, ema_decay=0.9, commitment=0.25).train()
    with torch.no_grad():
        vq.embedding.copy_(codebook)
        vq.ema_embed_sum.copy_(codebook)
    for _ in range(2):
        x = torch.randn(100, 8, generator=gen)
        out_peer, idx_peer, loss_peer = peer(x)
        out, idx, loss = vq(x)
        assert torch.equal(idx.long(), idx_peer)
        torch.testing.assert_close(out, out_peer)
        torch.testing.assert_close(loss.reshape(1), loss_peer)
        torch.testing.assert_close(vq.codebook, peer.embed[0], rtol=1e-5, atol=1e-6)
