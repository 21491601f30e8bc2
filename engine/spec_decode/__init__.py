"""Speculative decoding: proposers (n-gram prompt lookup, a greedy draft model) and the exact
rejection sampler that keeps the target model's distribution."""
