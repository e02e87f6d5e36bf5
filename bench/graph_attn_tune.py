"""Sweep of the Triton graph-attention launch configs on the GPU (registers no bench case):

    python -m bench.graph_attn_tune [--problem mesh300k powerlaw1m ...]

Times the forward and backward launchers (median ms, do_bench) for each LaunchConfig varied
one knob group at a time around DEFAULT_CONFIG; the winners go into DEFAULT_CONFIG."""
import argparse
import dataclasses

import torch


def sweep_configs(default):
    """Tiles x warps (the forward time reads fwd_tile, the backward's bwd_tile), then chunks."""
    configs = [dataclasses.replace(default, fwd_tile=t, bwd_tile=t, num_warps=w)
               for t in (256, 512, 1024, 2048) for w in (2, 4, 8)]
    configs += [dataclasses.replace(default, chunk=c) for c in (128, 256, 1024, 2048)]
    return [default] + [c for c in configs if c != default]


def time_config(inputs, config):
    import triton.testing

    from gtkernels.triton.graph_attn import graph_attention_forward
    from gtkernels.triton.graph_attn_bwd import graph_attention_backward

    g = inputs["graph"]
    graph = (g.indptr, g.indices, g.csc_indptr, g.csc_indices, g.csc_edge_ids)
    q, k, v = (inputs[n].detach() for n in "qkv")
    scale = q.shape[-1] ** -0.5
    out, lse = graph_attention_forward(*graph, q, k, v, None, None, scale, config)
    grad_out = torch.randn_like(out)

    def fwd():
        return graph_attention_forward(*graph, q, k, v, None, None, scale, config)

    def bwd():
        return graph_attention_backward(grad_out, None, q, k, v, out, lse, *graph, None, None,
                                        scale, config)
    return [triton.testing.do_bench(f, warmup=25, rep=100, return_mode="median")
            for f in (fwd, bwd)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.graph_attn_tune", description=__doc__)
    parser.add_argument("--problem", nargs="*", default=["mesh300k", "mesh300k-wide",
                                                          "powerlaw1m"])
    args = parser.parse_args(argv)

    from bench.core.registry import REGISTRY, load_families
    from gtkernels.triton.graph_attn import DEFAULT_CONFIG

    load_families()
    for name in args.problem:
        inputs = REGISTRY.problems[("graph_attn", name)].make("cuda", False)
        print(f"\n{name}: fwd ms, bwd ms, config")
        for config in sweep_configs(DEFAULT_CONFIG):
            try:
                fwd_ms, bwd_ms = time_config(inputs, config)
                print(f"  {fwd_ms:8.3f} {bwd_ms:8.3f}  {config}")
            except Exception as exc:  # a config that does not compile is a result
                print(f"  failed: {type(exc).__name__}: {str(exc)[:100]}  {config}")
        del inputs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
