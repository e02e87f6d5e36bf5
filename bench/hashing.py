"""Hashed-lookup family: sign hashing (the hash half of MemoryFormer's layer)."""
import torch

import gtkernels as gk
from bench.core.registry import impl, problem
from gtkernels.reference import hashing as ref

FAMILY = "hashing"


def count_mismatches(ours, peer):
    return f"{int((ours != peer).sum())} mismatches"


@problem(FAMILY, "sign-hash", compare=count_mismatches,
         note="mem-base's hash: T=16,384 tokens x 1024, tau=8, bf16")
def sign_hash_problem(device, quick):
    tokens = 1024 if quick else 16384
    x = torch.randn(tokens, 1024, device=device, dtype=torch.bfloat16)
    return {"x": x, "tau": 8}


@impl(FAMILY, "eager torch", problems=["sign-hash"])
def eager_sign_hash(inputs):
    return lambda: ref.sign_hash(inputs["x"], inputs["tau"])


@impl(FAMILY, "gtkernels", ours=True, problems=["sign-hash"])
def gk_sign_hash(inputs):
    return lambda: gk.sign_hash(inputs["x"], inputs["tau"])
