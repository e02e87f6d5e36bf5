"""Peer implementations shared by bench families (BENCH.md's "what a user would pick")."""
