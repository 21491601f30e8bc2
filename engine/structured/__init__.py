"""Guided decoding: grammar constraints (compiled by llguidance) → per-row token bitmasks.

`params` is plain data that crosses the seam (no torch, no llguidance); `grammar` compiles,
caches and runs the constraints and fills the batch's bitmask for the sampler.
"""
