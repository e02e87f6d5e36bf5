"""Pure-torch references of every op: the test oracle, runnable in float64, and readable
documentation of the semantics. Slow and memory-hungry by design: clarity first."""
