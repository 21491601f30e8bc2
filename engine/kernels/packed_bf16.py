"""bf16 matmuls over oneDNN's prepacked weights, read where they lie (cpu_kernels.c:
bf16_packed_linear). At one row oneDNN streams a prepacked weight well below the read
bandwidth (the default model's decode matmuls at ~0.78 of it, the small qkv and o projections
at ~0.48); this kernel reads the same bytes at about the bandwidth. Over more rows (batched
decode) it runs six at a time over each 64-column block while the block stays in L2:
1.1-1.5x oneDNN's GEMM at 16-32 rows on the default model's shapes. The sums are float32 and
rounded once, as oneDNN's: its values, or one bf16 rounding apart. Prefill stays on oneDNN's
GEMM over the same bytes (MAX_ROWS): the weight has no second copy.

The layout is oneDNN's choice, not ours: `address` checks a weight's size and one product
against oneDNN's call before anything reads it here, and says None (oneDNN's call stays) where
they differ: another oneDNN version, a CPU it lays out otherwise, or one without AVX512-BF16.
A block too large to stay in L2 (wide inputs: 7B-class down projections) would be read from
memory once per six rows, so `max_rows` leaves such weights to oneDNN past six rows."""

from __future__ import annotations

import os

import torch

from engine.kernels.native import has_bf16_dot_products, native_library, stream_prefetch

COLS = 64  # output columns per block of the prepacked weight (cpu_kernels.c's PACKED_COLS)
K_ALIGN = 32  # the inputs of a block's rows, zero-padded to a multiple (PACKED_K_ALIGN)
ROWS_PER_PASS = 6  # activation rows per pass over a block (PACKED_XROWS)
# the most rows `linear` is given: decode batches. Prefill-sized calls stay on oneDNN's GEMM:
# the kernel is 1.02-1.05x there per matmul but made prefill no faster in the engine
# (0.996-1.02x at 230 to 4096 tokens), and bf16 prefill sums in another order move the greedy
# choice at ~1% of positions of a long teacher-forced answer (the default model's fidelity
# tests' bf16 baseline)
MAX_ROWS = 32
# the largest block read by more than one pass: it must stay in L2 (1 MB on Zen 4 and 5)
# between the passes; the default model's widest, down_proj's, is 608 KiB
MAX_BLOCK_BYTES = 768 << 10
# "0" leaves every bf16 matmul on oneDNN's call (A/B benchmarks, debugging)
ENV = "PAGEDSERVE_PACKED_BF16"


def padded_in_features(in_features: int) -> int:
    return -(-in_features // K_ALIGN) * K_ALIGN


def max_rows(in_features: int) -> int:
    """The most rows a call to `linear` should have: MAX_ROWS where a block stays in L2
    between passes, else one pass's worth."""
    fits = COLS * padded_in_features(in_features) * 2 <= MAX_BLOCK_BYTES
    return MAX_ROWS if fits else ROWS_PER_PASS


def address(packed: torch.Tensor, out_features: int, in_features: int,
            bias: torch.Tensor | None) -> int | None:
    """The address of `packed` (mkldnn._reorder_linear_weight's [out, in] bf16 weight) where
    `linear` can read it: its bytes are the layout the kernel reads (checked by size and by one
    product against oneDNN's call on the same weight); else None."""
    if (os.environ.get(ENV, "1") == "0" or not _has_raw_access() or native_library() is None
            or not has_bf16_dot_products() or in_features % 2
            or tuple(packed.shape) != (out_features, in_features)
            or (bias is not None and (bias.dtype != torch.bfloat16 or not bias.is_contiguous()))):
        return None
    blocks = -(-out_features // COLS)
    if torch.ops.mkldnn._nbytes(packed) != blocks * COLS * padded_in_features(in_features) * 2:
        return None
    where = torch.ops.mkldnn.data_ptr(packed)
    if where % 64:  # the kernel's aligned 64-byte loads
        return None
    probe = torch.randn(3, in_features, generator=torch.Generator().manual_seed(0)).bfloat16()
    expected = torch.ops.mkldnn._linear_pointwise(probe, packed, bias, "none", [], "").float()
    got = linear(probe, where, in_features, bias, out_features).float()
    # one bf16 rounding apart at most; another layout gives products of the wrong weights
    tolerance = 1e-2 * float(expected.abs().max()) + 1e-6
    return where if bool(((got - expected).abs() <= tolerance).all()) else None


def _has_raw_access() -> bool:
    """Whether this torch gives a oneDNN tensor's address and size (2.3 and later do)."""
    return all(hasattr(torch.ops.mkldnn, name) for name in ("data_ptr", "_nbytes"))


def linear(x: torch.Tensor, weight_address: int, in_features: int, bias: torch.Tensor | None,
           out_features: int, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """y [M, out] = x [M, in] @ W^T + bias, x contiguous bf16 (any row count is computed;
    `max_rows` says where it is the faster call), W the prepacked weight at `weight_address`
    (from `address`). out_dtype float32: the same bf16 values, written widened (the LM head's
    logits without a second pass over them)."""
    lib = native_library()
    assert lib is not None
    assert out_dtype in (torch.bfloat16, torch.float32)
    num_rows = x.shape[0]
    out = x.new_empty(num_rows, out_features, dtype=out_dtype)
    kernel = (lib.bf16_packed_linear if out_dtype == torch.bfloat16
              else lib.bf16_packed_linear_f32)
    status = kernel(
        x.data_ptr(), num_rows, in_features, weight_address, padded_in_features(in_features),
        None if bias is None else bias.data_ptr(), out_features, out.data_ptr(),
        stream_prefetch(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"bf16_packed_linear: status {status}")
    return out
