"""gtkernels microbenchmarks: the problems of shared/BENCH.md, our ops beside their peers.

Run all: ``python -m bench`` (``--quick`` for small sizes, the default without a GPU).
Each family module registers its problems and implementations with ``bench.core.registry``.
"""
