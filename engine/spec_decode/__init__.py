"""Speculative decoding: proposers (n-gram prompt lookup; a draft model next) and the exact
rejection sampler that keeps the target model's distribution."""
