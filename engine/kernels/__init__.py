"""Native CPU kernels that torch does not offer in the form decode needs. Each is plain C,
built once with the system compiler into the cache directory and called through ctypes; when
it cannot be built (no compiler, a CPU without the instructions) a torch implementation of
the same arithmetic runs instead, slower but equal."""
