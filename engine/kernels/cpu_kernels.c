/* pagedserve's native CPU kernels (x86-64 with AVX-512 VNNI), built by engine/kernels/native.py:
 * the weight-int8 matmul and its dequantization for prefill; for bf16 models RMSNorm, SwiGLU
 * and paged decode attention.
 *
 * Weight-int8 matmul: y = x @ W^T (+ bias), bf16 in and out.
 *
 * Weights are quantized once at load, per output row (scale_n = max|W[n,:]| / 127) and stored
 * offset by 128 as unsigned bytes. Activations are quantized on every call, per row and per
 * block of 64 columns (llama.cpp's Q8_0 idea: a block scale keeps one outlier channel from
 * flattening the whole row). VNNI's vpdpbusd multiplies unsigned by signed bytes, so with
 * wu = wq + 128:
 *   sum_k xq[k] wq[n,k] = sum_k xq[k] wu[n,k] - 128 sum_k xq[k]
 * and the second term does not depend on n. One more vpdpbusd (128s against xq) gives it per
 * 32-bit lane; starting each block's accumulation from its negative leaves every block's dot
 * product exact in int32, so only the float scaling rounds:
 *
 *   y[m,n] = w_scale[n] * sum_b x_scale[m,b] * dot_b(wq[n], xq[m]) + bias[n]
 *
 * Decode reads each weight byte once per step: half the bytes of bf16, the whole point on a
 * CPU whose decode speed is its memory bandwidth. Plain C, no torch headers: the engine builds
 * it with the system compiler in a second and calls it through ctypes. */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 64 /* columns per activation scale: one zmm of bytes */
#define ROWS 4   /* weight rows per register tile */
#define XROWS 4  /* activation rows per register tile */
#define XCHUNK 64 /* activation rows per pass over the weights */
#define PREFETCH_TILES 2 /* how far ahead weight tiles are prefetched */
#define KEY_TILE 16      /* decode attention: keys scored together (one reduce16_ps) */

/* Balanced shares of a loop over items (weight blocks, column tiles) for a team of threads.
 * Each thread takes its static share front to back, the contiguous stream `schedule(static)`
 * gives it; one that runs out takes the last items left in another's share, one at a time. At
 * one row the two threads of a 2-core machine stream their halves at unequal rates (which
 * core is faster changes from call to call): with the static split one of them waited, summed
 * over a ~21 ms bf16 decode step of the default model, 2.2-2.4 ms for the other (the LM head
 * 0.5 ms, gate_up 1 ms); with shares 0.5-0.6 ms, most of it the down projection's 14 blocks of
 * 0.6 MB. An item is computed whole by one thread: the sums and their order do not change. */
typedef struct {
    _Alignas(64) _Atomic uint64_t span; /* next item (low 32 bits), end (high 32 bits) */
} share_t;
#define MAX_SHARES 256

static inline uint64_t share_span(int64_t next, int64_t end) {
    return (uint64_t)next | (uint64_t)end << 32;
}

/* how many shares (threads) a kernel asked for `nthreads` splits its items into */
static inline int share_count(int nthreads) {
    return nthreads < 1 ? 1 : nthreads > MAX_SHARES ? MAX_SHARES : nthreads;
}

/* n shares of `count` items (< 2^32), as even as a static schedule splits them */
static void shares_init(share_t *shares, int n, int64_t count) {
    for (int t = 0; t < n; t++)
        atomic_init(&shares[t].span, share_span(count * t / n, count * (t + 1) / n));
}

/* Thread t's next item: the front of its own share, else the back of another's; -1 when none
 * is left. */
static int64_t shares_next(share_t *shares, int n, int t) {
    uint64_t span = atomic_load_explicit(&shares[t].span, memory_order_relaxed);
    while ((uint32_t)span < span >> 32)
        if (atomic_compare_exchange_weak(&shares[t].span, &span, span + 1))
            return (int64_t)(uint32_t)span;
    for (int i = 1; i < n; i++) {
        share_t *other = &shares[(t + i) % n];
        span = atomic_load_explicit(&other->span, memory_order_relaxed);
        while ((uint32_t)span < span >> 32) {
            const int64_t last = (int64_t)(span >> 32) - 1;
            if (atomic_compare_exchange_weak(&other->span, &span,
                                             share_span((uint32_t)span, last)))
                return last;
        }
    }
    return -1;
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, NaN kept quiet */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* 16 bf16 values as float32 (exact) */
static inline __m512 load16_bf16(const uint16_t *p) {
    __m256i raw = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* v rounded to bf16 precision (nearest even), still as float32; NaN passes through */
static inline __m512 round_bf16_ps(__m512 v) {
    __m512i bits = _mm512_castps_si512(v);
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    bits = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), odd));
    bits = _mm512_and_si512(bits, _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_castsi512_ps(bits),
                                v);
}

/* 16 float32 values stored as bf16, rounded as f32_to_bf16 does (NaN stays a quiet NaN) */
static inline void store16_bf16(uint16_t *p, __m512 v) {
    __m512i bits = _mm512_castps_si512(round_bf16_ps(v));
    bits = _mm512_mask_or_epi32(bits, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), bits,
                                _mm512_set1_epi32(0x00400000));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16)));
}

/* One row of K bf16 activations -> K int8 (round half to even of x / scale) and K/BLOCK
 * scales (max |x| / 127 over the block); with `offsets`, also -128 * (the block's sum of int8
 * values) per block: what the weights' +128 adds to a block's dot product (w8a8_gemm). */
static void quantize_row(const uint16_t *x, int64_t K, int8_t *xq, float *scales,
                         int32_t *offsets) {
    for (int64_t b = 0; b < K / BLOCK; b++) {
        const uint16_t *xb = x + b * BLOCK;
        __m512 v[BLOCK / 16];
        __m512 amax = _mm512_setzero_ps();
        for (int i = 0; i < BLOCK / 16; i++) {
            v[i] = load16_bf16(xb + 16 * i);
            amax = _mm512_max_ps(amax, _mm512_abs_ps(v[i]));
        }
        float max_abs = _mm512_reduce_max_ps(amax);
        float scale = max_abs / 127.0f;
        __m512 inv = _mm512_set1_ps(scale > 0.0f ? 1.0f / scale : 0.0f);
        __m512i total = _mm512_setzero_si512();
        for (int i = 0; i < BLOCK / 16; i++) {
            __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], inv)); /* nearest even */
            q = _mm512_max_epi32(_mm512_min_epi32(q, _mm512_set1_epi32(127)),
                                 _mm512_set1_epi32(-127));
            total = _mm512_add_epi32(total, q);
            _mm_storeu_si128((__m128i *)(xq + b * BLOCK + 16 * i), _mm512_cvtepi32_epi8(q));
        }
        scales[b] = scale;
        if (offsets) offsets[b] = -128 * _mm512_reduce_add_epi32(total);
    }
}

/* A rows x xrows tile of outputs over all K. Constant tile sizes let the compiler keep
 * every accumulator in a register. */
static inline __attribute__((always_inline)) void tile(
    const int8_t *xq, const float *xs, int64_t m0, int xrows,
    const uint8_t *w, const float *wscale, const float *bias, int64_t n0, int rows,
    uint16_t *y, int64_t N, int64_t K, const uint8_t *prefetch) {
    const int64_t nb = K / BLOCK;
    __m512 acc[ROWS][XROWS];
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < XROWS; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i xv[XROWS], base[XROWS];
        __m512 sv[XROWS];
        for (int c = 0; c < XROWS; c++) {
            if (c >= xrows) break;
            xv[c] = _mm512_loadu_si512((const void *)(xq + (m0 + c) * K + b * BLOCK));
            sv[c] = _mm512_set1_ps(xs[(m0 + c) * nb + b]);
            /* -128 * (sum of each lane's 4 activations): the offset of wu, taken out exactly */
            base[c] = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), xv[c]));
        }
        if (prefetch) /* a later tile's bytes, in step: hardware prefetchers lose track of
                         ROWS interleaved row streams, and decode then waits on DRAM */
            for (int r = 0; r < ROWS; r++)
                _mm_prefetch((const char *)(prefetch + (b * ROWS + r) * BLOCK), _MM_HINT_T1);
        for (int r = 0; r < ROWS; r++) {
            if (r >= rows) break;
            __m512i wv = _mm512_loadu_si512((const void *)(w + (n0 + r) * K + b * BLOCK));
            for (int c = 0; c < XROWS; c++) {
                if (c >= xrows) break;
                __m512i d = _mm512_dpbusd_epi32(base[c], wv, xv[c]);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv[c], acc[r][c]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        if (r >= rows) break;
        const int64_t n = n0 + r;
        const float add = bias ? bias[n] : 0.0f;
        for (int c = 0; c < XROWS; c++) {
            if (c >= xrows) break;
            y[(m0 + c) * N + n] = f32_to_bf16(wscale[n] * _mm512_reduce_add_ps(acc[r][c]) + add);
        }
    }
}

static void rows_block(const int8_t *xq, const float *xs, int64_t M,
                       const uint8_t *w, const float *wscale, const float *bias, int64_t n0,
                       int rows, uint16_t *y, int64_t N, int64_t K) {
    /* the tile after next (contiguous, PREFETCH_TILES ahead: enough to cover DRAM latency at
     * decode's pace), prefetched into L2 during the first pass over this one */
    const uint8_t *next =
        n0 + (PREFETCH_TILES + 1) * ROWS <= N ? w + (n0 + PREFETCH_TILES * ROWS) * K : NULL;
    int64_t m0 = 0;
    if (rows == ROWS) {
        for (; m0 + XROWS <= M; m0 += XROWS)
            tile(xq, xs, m0, XROWS, w, wscale, bias, n0, ROWS, y, N, K, m0 == 0 ? next : NULL);
        for (; m0 < M; m0++)
            tile(xq, xs, m0, 1, w, wscale, bias, n0, ROWS, y, N, K, m0 == 0 ? next : NULL);
    } else {
        for (; m0 < M; m0++)
            tile(xq, xs, m0, 1, w, wscale, bias, n0, rows, y, N, K, NULL);
    }
}

/* x [M, K] bf16, w [N, K] uint8 (wq + 128), wscale [N] f32, bias [N] f32 or NULL,
 * y [M, N] bf16. K must be a multiple of 64. Returns 0, or -1 when scratch memory ran out. */
int w8a8_linear(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *wscale,
                const float *bias, int64_t N, uint16_t *y, int nthreads) {
    const int64_t nb = K / BLOCK;
    int8_t *xq = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *xs = malloc(sizeof(float) * (size_t)(M * nb));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) quantize_row(x + m * K, K, xq + m * K, xs + m * nb, NULL);
    const int64_t tiles = (N + ROWS - 1) / ROWS;
    /* a chunk of activation rows stays in L2 while every weight tile streams past it once */
    for (int64_t m0 = 0; m0 < M; m0 += XCHUNK) {
        const int64_t mc = M - m0 < XCHUNK ? M - m0 : XCHUNK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const int64_t n0 = t * ROWS;
            const int rows = (int)(N - n0 < ROWS ? N - n0 : ROWS);
            rows_block(xq + m0 * K, xs + m0 * nb, mc, w, wscale, bias, n0, rows,
                       y + m0 * N, N, K);
        }
    }
    free(xq);
    free(xs);
    return 0;
}

/* ---- int8 GEMM for batches (W8A8): the same arithmetic as w8a8_linear, laid out for many
 * activation rows ----
 *
 * w8a8_linear's tiles dot 64 bytes of one weight row with 64 of one activation row: one
 * vpdpbusd then a conversion and an FMA per block, a third of the int8 rate. Here a vpdpbusd
 * takes 16 output columns at once, 4 reduction indices each, against 4 bytes of one activation
 * row broadcast, so a block of 64 columns is 16 vpdpbusd into one int32 sum per output before
 * its single conversion and FMA by the activation's block scale. The weights are repacked
 * once at load for it: [N / 16][K / 4][16][4] bytes (wq + 128, as the rows store them; N
 * padded with zero weights). The +128 comes back out exactly: each int32 sum starts at -128 x
 * the activation block's sum. A register tile is GEMM_ROWS activation rows x GEMM_COLS
 * 16-column groups: 12 int32 and 12 float sums, the weights read once per 4 rows.
 * Throughput against oneDNN's bf16 matmul (2 threads, Zen 5): 1.3-1.5x at 256 rows, 1.4-2x at
 * 16, for the default model's four shapes. */
#define GEMM_ROWS 4
#define GEMM_COLS 3

/* w [N, K] bytes -> the packed layout above, into out [(N + 15) / 16 * 16 * K] */
void w8_pack_columns(const uint8_t *w, int64_t N, int64_t K, uint8_t *out, int nthreads) {
    const int64_t groups = (N + 15) / 16, quads = K / 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < groups; j++)
        for (int64_t l = 0; l < 16; l++) {
            const int64_t n = j * 16 + l;
            for (int64_t q = 0; q < quads; q++) {
                uint32_t quad = 0x80808080u; /* four zero weights */
                if (n < N) memcpy(&quad, w + n * K + q * 4, sizeof quad);
                memcpy(out + ((j * quads + q) * 16 + l) * 4, &quad, sizeof quad);
            }
        }
}

static inline __attribute__((always_inline)) void gemm_tile(
    const int8_t *xq, const float *xs, const int32_t *xoff, int64_t m0, const int rows,
    const uint8_t *wp, int64_t j0, int cols, const float *wscale, const float *bias,
    uint16_t *y, int64_t N, int64_t K) {
    const int64_t nb = K / BLOCK, quads = K / 4;
    __m512 acc[GEMM_ROWS][GEMM_COLS];
    const uint8_t *wj[GEMM_COLS];
    for (int c = 0; c < GEMM_COLS; c++) /* a missing group repeats one, never stored */
        wj[c] = wp + (j0 + (c < cols ? c : 0)) * quads * 64;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < GEMM_COLS; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        __m512i dot[GEMM_ROWS][GEMM_COLS];
        for (int r = 0; r < rows; r++) {
            const __m512i start = _mm512_set1_epi32(xoff[(m0 + r) * nb + b]);
            for (int c = 0; c < GEMM_COLS; c++) dot[r][c] = start;
        }
        /* unrolled: GCC otherwise copies every sum between registers on each step */
        _Pragma("GCC unroll 16") for (int q = 0; q < BLOCK / 4; q++) {
            __m512i wv[GEMM_COLS];
            for (int c = 0; c < GEMM_COLS; c++)
                wv[c] = _mm512_loadu_si512((const void *)(wj[c] + (b * (BLOCK / 4) + q) * 64));
            for (int r = 0; r < rows; r++) {
                int32_t quad;
                memcpy(&quad, xq + (m0 + r) * K + b * BLOCK + q * 4, sizeof quad);
                const __m512i xv = _mm512_set1_epi32(quad);
                for (int c = 0; c < GEMM_COLS; c++)
                    dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], wv[c], xv);
            }
        }
        for (int r = 0; r < rows; r++) {
            const __m512 scale = _mm512_set1_ps(xs[(m0 + r) * nb + b]);
            for (int c = 0; c < GEMM_COLS; c++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][c]), scale, acc[r][c]);
        }
    }
    for (int c = 0; c < cols; c++) {
        const int64_t n0 = (j0 + c) * 16;
        const int64_t width = N - n0 < 16 ? N - n0 : 16;
        const __mmask16 keep = (__mmask16)((1u << width) - 1u);
        const __m512 ws = _mm512_maskz_loadu_ps(keep, wscale + n0);
        const __m512 add = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++) {
            uint16_t out[16];
            store16_bf16(out, _mm512_fmadd_ps(acc[r][c], ws, add));
            memcpy(y + (m0 + r) * N + n0, out, sizeof(uint16_t) * (size_t)width);
        }
    }
}

/* x [M, K] bf16, w packed by w8_pack_columns, wscale [N] f32, bias [N] f32 or NULL, y [M, N]
 * bf16. K must be a multiple of 64. Returns 0, or -1 when scratch memory ran out. */
int w8a8_gemm(const uint16_t *x, int64_t M, int64_t K, const uint8_t *w, const float *wscale,
              const float *bias, int64_t N, uint16_t *y, int nthreads) {
    const int64_t nb = K / BLOCK;
    int8_t *xq = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *xs = malloc(sizeof(float) * (size_t)(M * nb));
    int32_t *xoff = malloc(sizeof(int32_t) * (size_t)(M * nb));
    if (!xq || !xs || !xoff) {
        free(xq);
        free(xs);
        free(xoff);
        return -1;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++)
        quantize_row(x + m * K, K, xq + m * K, xs + m * nb, xoff + m * nb);
    const int64_t groups = (N + 15) / 16, tiles = (groups + GEMM_COLS - 1) / GEMM_COLS;
    /* each thread's weight columns stay in cache while every activation row passes them */
    const int teams = share_count(nthreads);
    share_t shares[teams];
    shares_init(shares, teams, tiles);
#pragma omp parallel num_threads(teams)
    for (int64_t t; (t = shares_next(shares, teams, omp_get_thread_num())) >= 0;) {
        const int64_t j0 = t * GEMM_COLS;
        const int cols = (int)(groups - j0 < GEMM_COLS ? groups - j0 : GEMM_COLS);
        int64_t m0 = 0;
        for (; m0 + GEMM_ROWS <= M; m0 += GEMM_ROWS)
            gemm_tile(xq, xs, xoff, m0, GEMM_ROWS, w, j0, cols, wscale, bias, y, N, K);
        for (; m0 < M; m0++)
            gemm_tile(xq, xs, xoff, m0, 1, w, j0, cols, wscale, bias, y, N, K);
    }
    free(xq);
    free(xs);
    free(xoff);
    return 0;
}

/* ---- int4 weights with int8 activations on AVX-512 VNNI: w4a16's q8 arithmetic over 16
 * output columns at a time ----
 *
 * cpu_portable.c's int4_linear_q8 (AVX2) dots one weight row's nibbles with one activation
 * row's int8 values, maddubs and madd per 32-value block. Here, as in w8a8_gemm, one vpdpbusd
 * takes 16 output columns and 4 reduction indices against 4 activation bytes broadcast. The
 * nibbles are repacked once at load: [N / 16][K / 8][16] 32-bit lanes, lane l of a group
 * holding column 16j + l's values k .. k + 7 of an octet as the low nibbles (k .. k + 3) and the
 * high ones (k + 4 .. k + 7) of its four bytes, so one load, a shift and two ANDs give two
 * vpdpbusd operands. Scales and zero points go to [N / 16][G][16] as float16 (the scales are
 * float16 already; zero points are small integers): 6% fewer bytes per one-row call than
 * float32 scale and zero * scale. Padding columns are zero.
 * Activations: int4_q8_quantize_row's blocks of 32 (w4a16.quantize_activations_q8's rounding),
 * in their natural order. Per block: an exact int32 sum of 32 products per column, times the
 * block's scale into the group's float sum; per group: times the column's scale, less its zero
 * term (zero * scale x the group's sum of dequantized activations). */
#define Q4_BLOCK 32
#define Q4_ROWS 4
#define Q4_COLS 2
#define Q4_ROW_STRETCH 128 /* activation rows per pass over the weights (int4_gemm_q8) */
/* one-row decode prefetches the next tile during the first pass over this one: into L1, 7%
 * faster on Zen 5 than the int8 kernel's two tiles ahead into L2, over the default model's
 * matmuls. Where every tile is read by one pass (a stretch of 1 or Q4_ROWS rows) the caller's
 * `stream` kind applies (below): on Zen 5 non-temporal, 2-3% faster (paired, two runs of 8
 * rounds); on Zen 4 into L2, 1.24x faster than non-temporal (0.80x the time, 6 rounds). More
 * passes need the tile in L1 and L2 for the next ones. */
#define Q4_PREFETCH_TILES 1

/* Where a prefetch puts a weight line. A stream of lines that one pass reads once (one-row
 * decode) goes where this CPU streams fastest, which differs by microarchitecture: Zen 5
 * gains from non-temporal prefetches to L1 (kept out of L2 and L3), Zen 4 loses a fifth of
 * its speed with them (or with T0) and is fastest prefetching into L2, whose miss queue is
 * deeper than L1's. Callers pass PREFETCH_NTA or PREFETCH_L2 as `stream`
 * (engine/kernels/native.py: stream_prefetch); lines read by several passes go to L1. */
enum prefetch_kind { PREFETCH_L1 = 0, PREFETCH_L2 = 1, PREFETCH_NTA = 2 };

static inline __attribute__((always_inline)) void prefetch_line(const char *p, const int kind) {
    if (kind == PREFETCH_NTA)
        _mm_prefetch(p, _MM_HINT_NTA);
    else if (kind == PREFETCH_L2)
        _mm_prefetch(p, _MM_HINT_T1);
    else
        _mm_prefetch(p, _MM_HINT_T0);
}

void int4_pack_columns(const uint8_t *packed, const uint16_t *scales, const uint8_t *zeros,
                       int64_t N, int64_t K, int64_t G, uint32_t *w, uint16_t *s, uint16_t *z,
                       int nthreads) {
    const int64_t groups = (N + 15) / 16, octets = K / 8, half = K / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < groups; j++)
        for (int64_t l = 0; l < 16; l++) {
            const int64_t n = j * 16 + l;
            for (int64_t o = 0; o < octets; o++) {
                uint32_t lane = 0;
                if (n < N)
                    for (int c = 0; c < 4; c++) {
                        /* values k = 8o + c and 8o + 4 + c; byte b of a row holds 2b (low) and
                         * 2b + 1 (high) */
                        const int64_t lo_k = 8 * o + c, hi_k = 8 * o + 4 + c;
                        const uint8_t lo = (packed[n * half + lo_k / 2] >> (4 * (lo_k % 2))) & 15;
                        const uint8_t hi = (packed[n * half + hi_k / 2] >> (4 * (hi_k % 2))) & 15;
                        lane |= (uint32_t)(lo | hi << 4) << (8 * c);
                    }
                w[(j * octets + o) * 16 + l] = lane;
            }
            for (int64_t g = 0; g < G; g++) {
                s[(j * G + g) * 16 + l] = n < N ? scales[n * G + g] : 0; /* float16 bits */
                z[(j * G + g) * 16 + l] = n < N ? _cvtss_sh((float)zeros[n * G + g], 0) : 0;
            }
        }
}

/* One row of K float32 activations -> int8 per block of 32 (scale max|x| / 127, values
 * nearbyint(x * (127 / max|x|))), the block scales, and per group the sum of the dequantized
 * values (block scale x the block's integer sum, added block by block). */
static void int4_q8_quantize_row(const void *x, int bf16, int64_t K, int64_t group_size,
                                 int8_t *xq, float *x_scales, float *x_group_sums) {
    const int64_t blocks = K / Q4_BLOCK;
    for (int64_t g = 0; g < K / group_size; g++) x_group_sums[g] = 0.0f;
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t at = b * Q4_BLOCK;
        const __m512 v0 = bf16 ? load16_bf16((const uint16_t *)x + at)
                               : _mm512_loadu_ps((const float *)x + at);
        const __m512 v1 = bf16 ? load16_bf16((const uint16_t *)x + at + 16)
                               : _mm512_loadu_ps((const float *)x + at + 16);
        const float amax = _mm512_reduce_max_ps(
            _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)); /* nearest even */
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, inv));
        _mm_storeu_si128((__m128i *)(xq + b * Q4_BLOCK), _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + b * Q4_BLOCK + 16), _mm512_cvtepi32_epi8(q1));
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        x_scales[b] = amax / 127.0f;
        x_group_sums[b * Q4_BLOCK / group_size] += amax / 127.0f * (float)sum;
    }
}

static inline __attribute__((always_inline)) void int4_tile(
    const int8_t *xq, const float *xs, const float *xgs, int64_t m0, const int rows,
    const uint32_t *w, const uint16_t *s, const uint16_t *z, int64_t j0, int cols, void *out,
    int bf16, int64_t N, int64_t K, int64_t G, const char *prefetch, const int kind) {
    const int64_t octets = K / 8, blocks = K / Q4_BLOCK, per_group = blocks / G;
    const __m512i low = _mm512_set1_epi8(15);
    __m512 total[Q4_ROWS][Q4_COLS];
    const uint32_t *wj[Q4_COLS];
    for (int c = 0; c < Q4_COLS; c++) wj[c] = w + (j0 + (c < cols ? c : 0)) * octets * 16;
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < Q4_COLS; c++) total[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 acc[Q4_ROWS][Q4_COLS];
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < Q4_COLS; c++) acc[r][c] = _mm512_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            __m512i dot[Q4_ROWS][Q4_COLS];
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < Q4_COLS; c++) dot[r][c] = _mm512_setzero_si512();
            if (prefetch) /* a later tile's block, in step (see rows_block) */
                for (int l = 0; l < Q4_COLS * Q4_BLOCK / 8; l++)
                    prefetch_line(prefetch + (b * Q4_COLS * Q4_BLOCK / 8 + l) * 64, kind);
            _Pragma("GCC unroll 4") for (int o = 0; o < Q4_BLOCK / 8; o++) {
                __m512i lo[Q4_COLS], hi[Q4_COLS];
                for (int c = 0; c < Q4_COLS; c++) {
                    const __m512i lanes = _mm512_loadu_si512(
                        (const void *)(wj[c] + (b * (Q4_BLOCK / 8) + o) * 16));
                    lo[c] = _mm512_and_si512(lanes, low);
                    hi[c] = _mm512_and_si512(_mm512_srli_epi32(lanes, 4), low);
                }
                for (int r = 0; r < rows; r++) {
                    int32_t first, second;
                    memcpy(&first, xq + (m0 + r) * K + b * Q4_BLOCK + 8 * o, 4);
                    memcpy(&second, xq + (m0 + r) * K + b * Q4_BLOCK + 8 * o + 4, 4);
                    const __m512i xa = _mm512_set1_epi32(first), xb = _mm512_set1_epi32(second);
                    for (int c = 0; c < Q4_COLS; c++) {
                        dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], lo[c], xa);
                        dot[r][c] = _mm512_dpbusd_epi32(dot[r][c], hi[c], xb);
                    }
                }
            }
            for (int r = 0; r < rows; r++) {
                const __m512 scale = _mm512_set1_ps(xs[(m0 + r) * blocks + b]);
                for (int c = 0; c < Q4_COLS; c++)
                    acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r][c]), scale, acc[r][c]);
            }
        }
        for (int c = 0; c < Q4_COLS; c++) {
            /* float16 scale and zero point; zero * scale is exact in float32 (an integer
             * below 17 times an 11-bit significand), as the oracle's */
            const __m512 scale = _mm512_cvtph_ps(
                _mm256_loadu_si256((const __m256i *)(s + ((j0 + c) * G + g) * 16)));
            const __m512 zero = _mm512_mul_ps(
                _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(z + ((j0 + c) * G + g) * 16))),
                scale);
            for (int r = 0; r < rows; r++) {
                total[r][c] = _mm512_fmadd_ps(acc[r][c], scale, total[r][c]);
                total[r][c] = _mm512_fnmadd_ps(zero, _mm512_set1_ps(xgs[(m0 + r) * G + g]),
                                               total[r][c]);
            }
        }
    }
    for (int c = 0; c < cols; c++) {
        const int64_t n0 = (j0 + c) * 16;
        const int64_t width = N - n0 < 16 ? N - n0 : 16;
        const __mmask16 keep = (__mmask16)((1u << width) - 1u);
        for (int r = 0; r < rows; r++) {
            if (bf16) {
                uint16_t row[16];
                store16_bf16(row, total[r][c]);
                memcpy((uint16_t *)out + (m0 + r) * N + n0, row, sizeof(uint16_t) * (size_t)width);
            } else {
                _mm512_mask_storeu_ps((float *)out + (m0 + r) * N + n0, keep, total[r][c]);
            }
        }
    }
}

/* x [M, K] and out [M, N], float32, or bf16 where `bf16` is set (prefill's activations,
 * neither copied nor widened: at 4096 rows a float32 copy of x costs more than the matmul's
 * saving); w, s, z from int4_pack_columns. group_size must be a multiple of 32 dividing K.
 * stream: PREFETCH_NTA or PREFETCH_L2, for tiles read by one pass. Returns 0, -1 for a shape
 * it does not take, -2 when scratch memory ran out. */
int int4_gemm_q8(const void *x, int64_t M, int64_t K, const uint32_t *w, const uint16_t *s,
                 const uint16_t *z, int64_t N, int64_t group_size, void *out, int bf16,
                 int stream, int nthreads) {
    if (M < 1 || group_size % Q4_BLOCK || K % group_size) return -1;
    const int64_t G = K / group_size, blocks = K / Q4_BLOCK, octets = K / 8;
    int8_t *xq = malloc((size_t)(M * K));
    float *xs = malloc(sizeof(float) * (size_t)(M * blocks));
    float *xgs = malloc(sizeof(float) * (size_t)(M * G));
    if (!xq || !xs || !xgs) {
        free(xq);
        free(xs);
        free(xgs);
        return -2;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++)
        int4_q8_quantize_row(bf16 ? (const void *)((const uint16_t *)x + m * K)
                                  : (const void *)((const float *)x + m * K),
                             bf16, K, group_size, xq + m * K, xs + m * blocks, xgs + m * G);
    const int64_t groups = (N + 15) / 16, tiles = (groups + Q4_COLS - 1) / Q4_COLS;
    const int teams = share_count(nthreads);
    share_t shares[teams];
    /* rows in stretches whose int8 activations stay in L2 while every weight tile passes */
    for (int64_t m_start = 0; m_start < M; m_start += Q4_ROW_STRETCH) {
        const int64_t m_end = M - m_start < Q4_ROW_STRETCH ? M : m_start + Q4_ROW_STRETCH;
        const int one_pass = m_end - m_start == 1 || m_end - m_start == Q4_ROWS;
        const int kind = one_pass ? stream : PREFETCH_L1;
        shares_init(shares, teams, tiles);
#pragma omp parallel num_threads(teams)
        for (int64_t t; (t = shares_next(shares, teams, omp_get_thread_num())) >= 0;) {
            const int64_t j0 = t * Q4_COLS;
            const int cols = (int)(groups - j0 < Q4_COLS ? groups - j0 : Q4_COLS);
            /* the tile Q4_PREFETCH_TILES ahead (contiguous), during the first pass */
            const char *ahead =
                j0 + (Q4_PREFETCH_TILES + 1) * Q4_COLS <= groups
                    ? (const char *)(w + (j0 + Q4_PREFETCH_TILES * Q4_COLS) * octets * 16)
                    : NULL;
            int64_t m0 = m_start;
            for (; m0 + Q4_ROWS <= m_end; m0 += Q4_ROWS)
                int4_tile(xq, xs, xgs, m0, Q4_ROWS, w, s, z, j0, cols, out, bf16, N, K, G,
                          m0 == m_start ? ahead : NULL, kind);
            for (; m0 < m_end; m0++)
                int4_tile(xq, xs, xgs, m0, 1, w, s, z, j0, cols, out, bf16, N, K, G,
                          m0 == m_start ? ahead : NULL, kind);
        }
    }
    free(xq);
    free(xs);
    free(xgs);
    return 0;
}

/* W [N, K] back to bf16, (wu - 128) * scale_n: for prefill-sized batches, where a bf16 matmul
 * over the dequantized weight beats the int8 tiles (compute-bound there, not memory-bound).
 * Exact: |wq| <= 127 fits bf16's 8 significant bits, and the product rounds once. */
void w8_dequantize(const uint8_t *w, const float *wscale, int64_t N, int64_t K, uint16_t *out,
                   int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const __m512 scale = _mm512_set1_ps(wscale[n]);
        const __m512 offset = _mm512_set1_ps(128.0f);
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)(w + n * K + k));
            __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes));
            store16_bf16(out + n * K + k, _mm512_mul_ps(_mm512_sub_ps(v, offset), scale));
        }
        for (; k < K; k++) out[n * K + k] = f32_to_bf16(((float)w[n * K + k] - 128.0f) * wscale[n]);
    }
}

/* w8_dequantize over w8_pack_columns' layout ([N / 16][K / 4][16][4]), for weights whose
 * column copy is their only copy. Four quads of a 16-column group (64 bytes each: a dword of
 * 4 values per column) are transposed in registers, 4 x 4 dwords per 128-bit lane, into each
 * column's 16 consecutive values, then scaled and stored as a row of the bf16 weight. */
#define W8_STORE_ROW(r, lane)                                                                  \
    do {                                                                                       \
        const int64_t n = j * 16 + 4 * (lane) + (r);                                           \
        if (n < N) {                                                                           \
            const __m512 v = _mm512_cvtepi32_ps(                                               \
                _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(rows[r], lane)));               \
            store16_bf16(out + n * K + 4 * q,                                                  \
                         _mm512_mul_ps(_mm512_sub_ps(v, offset), _mm512_set1_ps(wscale[n])));  \
        }                                                                                      \
    } while (0)

void w8_dequantize_columns(const uint8_t *w, const float *wscale, int64_t N, int64_t K,
                           uint16_t *out, int nthreads) {
    const int64_t groups = (N + 15) / 16, quads = K / 4;
    const __m512 offset = _mm512_set1_ps(128.0f);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t j = 0; j < groups; j++)
        for (int64_t q = 0; q < quads; q += 4) { /* K is a multiple of 64: quads of 4 */
            const uint8_t *src = w + (j * quads + q) * 64;
            const __m512i v0 = _mm512_loadu_si512((const void *)src);
            const __m512i v1 = _mm512_loadu_si512((const void *)(src + 64));
            const __m512i v2 = _mm512_loadu_si512((const void *)(src + 128));
            const __m512i v3 = _mm512_loadu_si512((const void *)(src + 192));
            const __m512i t0 = _mm512_unpacklo_epi32(v0, v1), t1 = _mm512_unpackhi_epi32(v0, v1);
            const __m512i t2 = _mm512_unpacklo_epi32(v2, v3), t3 = _mm512_unpackhi_epi32(v2, v3);
            /* rows[r], 128-bit lane L: column 4L + r's values 4q .. 4q + 15 */
            const __m512i rows[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                                     _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
            for (int r = 0; r < 4; r++) {
                W8_STORE_ROW(r, 0);
                W8_STORE_ROW(r, 1);
                W8_STORE_ROW(r, 2);
                W8_STORE_ROW(r, 3);
            }
        }
}
#undef W8_STORE_ROW

/* bf16 matmuls over oneDNN's prepacked weight, read where it lies: blocks of PACKED_COLS output
 * columns, each [Kp / 2][PACKED_COLS][2] (pairs of inputs, Kp = K rounded up to
 * PACKED_K_ALIGN, the last block's columns and the pad zero), the layout
 * mkldnn._reorder_linear_weight gives on AVX512-BF16 CPUs; engine/kernels/packed_bf16.py
 * checks every weight against oneDNN before it is read here. At one row oneDNN streams the
 * default model's weights at ~0.75 of the read bandwidth, and this loop, one vdpbf16ps per 64
 * bytes with the block prefetched ahead, at ~1.0 (same process, 97 matmuls in model order).
 * More rows go PACKED_XROWS at a time over a block, which stays in L2 between them (the
 * caller keeps blocks that would not to few rows): 1.1-1.5x oneDNN's GEMM at 16-32 rows on
 * the default model's shapes (1.02-1.05x at 512-1024, where the engine keeps oneDNN's). The
 * sums are float32 in oneDNN's order at one row, the bias added before the one rounding:
 * oneDNN's values, or one bf16 rounding apart where it orders its sums otherwise. */
#define PACKED_COLS 64
#define PACKED_K_ALIGN 32
#define PACKED_XROWS 6          /* activation rows per pass over a block: 24 sums in registers */
/* How far ahead of the loads the weight is prefetched, and where to. One row reads each
 * block once, a stream (`stream`, see prefetch_line). On Zen 5, prefetchnta 1 KB ahead (two
 * steps of its loop) keeps it out of L2 and L3, where it would only evict other lines: the
 * default model's one-row matmuls in model order go from 0.93-0.95 of the read bandwidth to
 * 1.03-1.05 (1.08-1.13x paired; T0 at 1 KB: 1.06x, NTA at 2 KB: 1.08x). On Zen 4 the same
 * loop reaches 0.66 of it, and prefetcht1 4 KB ahead 0.79 (1.26x paired, 10 rounds; T1 at
 * 2 KB 1.20x, at 8 KB slower; no prefetch 1.18x). Streaming into L2, the loop reads with
 * 256-bit loads (packed_row_l2): on that Zen 4 the 97 one-row matmuls took 0.976x the time
 * of the 512-bit loop's best (T1 4 KB) over 150 alternating rounds, at either of its read
 * bandwidth's levels, and the engine's decode step 0.960x (12 rounds, library swapped in
 * one process); a plain read of 1 GiB with 256-bit loads matched torch's sum where 512-bit
 * ones reached 0.88 of it. It wants the line 2 KB ahead (4 KB: 1.17x the time). More rows
 * prefetch into L1 and L2 2 KB ahead: a block read by several passes stays in L2 between
 * them (at 4 rows NTA measured 0.98x on Zen 5; T1 on Zen 4 1.03-1.05x slower at 6 and 16
 * rows). */
#define PACKED_PREFETCH_NTA 1024
#define PACKED_PREFETCH_L2 2048
#define PACKED_PREFETCH 2048

/* R activation rows (1..PACKED_XROWS) against one block: out [R][64] float32. One row keeps
 * even and odd input pairs in separate sums (8 chains), more rows have 4R already; one row
 * here is the non-temporal stream (Zen 5), into L2 it is packed_row_l2. */
static inline __attribute__((always_inline, target("avx512bf16"))) void packed_block(
    const __m512i *w, const uint16_t *x, int64_t K, int64_t K2, const int R, float *out) {
    __m512 acc[PACKED_XROWS][4], odd[4];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int j = 0; j < 4; j++) odd[j] = _mm512_setzero_ps();
    int64_t k = 0;
    if (R == 1) {
        const uint32_t *xp = (const uint32_t *)x;
        for (; k + 1 < K2; k += 2, w += 8) {
            for (int line = 0; line < 8; line++)
                prefetch_line((const char *)w + PACKED_PREFETCH_NTA + 64 * line, PREFETCH_NTA);
            const __m512bh x0 = (__m512bh)_mm512_set1_epi32((int)xp[k]);
            const __m512bh x1 = (__m512bh)_mm512_set1_epi32((int)xp[k + 1]);
            for (int j = 0; j < 4; j++) {
                acc[0][j] = _mm512_dpbf16_ps(acc[0][j], (__m512bh)_mm512_load_si512(w + j), x0);
                odd[j] = _mm512_dpbf16_ps(odd[j], (__m512bh)_mm512_load_si512(w + 4 + j), x1);
            }
        }
    }
    for (; k < K2; k++, w += 4) {
        for (int line = 0; line < 4; line++)
            prefetch_line((const char *)w + PACKED_PREFETCH + 64 * line, PREFETCH_L1);
        __m512bh wv[4];
        for (int j = 0; j < 4; j++) wv[j] = (__m512bh)_mm512_load_si512(w + j);
        for (int r = 0; r < R; r++) {
            const __m512bh xr = (__m512bh)_mm512_set1_epi32(
                (int)((const uint32_t *)(x + r * K))[k]);
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv[j], xr);
        }
    }
    for (int j = 0; j < 4; j++) acc[0][j] = _mm512_add_ps(acc[0][j], odd[j]);
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + r * 64 + j * 16, acc[r][j]);
}

/* One row against one block streamed into L2, in 256-bit loads (see PACKED_PREFETCH_L2): the
 * same sums as packed_block's one-row loop, column by column (8 columns a register where
 * that has 16), so the same bits. out [64] float32. */
static inline __attribute__((always_inline, target("avx512bf16,avx512vl"))) void packed_row_l2(
    const __m256i *w, const uint16_t *x, int64_t K2, float *out) {
    __m256 even[8], odd[8];
    for (int j = 0; j < 8; j++) even[j] = odd[j] = _mm256_setzero_ps();
    const uint32_t *xp = (const uint32_t *)x;
    int64_t k = 0;
    for (; k + 1 < K2; k += 2, w += 16) {
        for (int line = 0; line < 8; line++)
            prefetch_line((const char *)w + PACKED_PREFETCH_L2 + 64 * line, PREFETCH_L2);
        const __m256bh x0 = (__m256bh)_mm256_set1_epi32((int)xp[k]);
        const __m256bh x1 = (__m256bh)_mm256_set1_epi32((int)xp[k + 1]);
        for (int j = 0; j < 8; j++) {
            even[j] = _mm256_dpbf16_ps(even[j], (__m256bh)_mm256_load_si256(w + j), x0);
            odd[j] = _mm256_dpbf16_ps(odd[j], (__m256bh)_mm256_load_si256(w + 8 + j), x1);
        }
    }
    if (k < K2) { /* an odd last pair goes to the even sums, as in packed_block */
        const __m256bh xk = (__m256bh)_mm256_set1_epi32((int)xp[k]);
        for (int j = 0; j < 8; j++)
            even[j] = _mm256_dpbf16_ps(even[j], (__m256bh)_mm256_load_si256(w + j), xk);
    }
    for (int j = 0; j < 8; j++) _mm256_storeu_ps(out + 8 * j, _mm256_add_ps(even[j], odd[j]));
}

/* bf16_packed_linear, and bf16_packed_linear_f32 (f32_out: y is float32, each value the bf16
 * one widened). */
static inline __attribute__((always_inline, target("avx512bf16"))) int packed_linear(
    const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t Kp,
    const uint16_t *bias, int64_t N, void *y, const int f32_out, int stream, int nthreads) {
    if (K % 2 || Kp < K || Kp % PACKED_K_ALIGN) return -1;
    const int64_t blocks = (N + PACKED_COLS - 1) / PACKED_COLS, K2 = K / 2;
    const int teams = share_count(nthreads);
    share_t shares[teams];
    shares_init(shares, teams, blocks);
#pragma omp parallel num_threads(teams) if (blocks > 1)
    for (int64_t b; (b = shares_next(shares, teams, omp_get_thread_num())) >= 0;) {
        const __m512i *block = (const __m512i *)(w + b * PACKED_COLS * Kp);
        const int64_t n0 = b * PACKED_COLS;
        const int64_t cols = N - n0 < PACKED_COLS ? N - n0 : PACKED_COLS;
        for (int64_t m = 0; m < M; m += PACKED_XROWS) {
            _Alignas(64) float out[PACKED_XROWS * PACKED_COLS];
            const uint16_t *xm = x + m * K;
            const int64_t rows = M - m < PACKED_XROWS ? M - m : PACKED_XROWS;
            switch (rows) { /* constant row counts: the sums stay in registers */
            case 1: /* one loop per kind */
                if (stream == PREFETCH_NTA)
                    packed_block(block, xm, K, K2, 1, out);
                else
                    packed_row_l2((const __m256i *)block, xm, K2, out);
                break;
            case 2: packed_block(block, xm, K, K2, 2, out); break;
            case 3: packed_block(block, xm, K, K2, 3, out); break;
            case 4: packed_block(block, xm, K, K2, 4, out); break;
            case 5: packed_block(block, xm, K, K2, 5, out); break;
            default: packed_block(block, xm, K, K2, 6, out); break;
            }
            for (int64_t r = 0; r < rows; r++)
                for (int64_t c = 0; c < cols; c += 16) {
                    const __mmask16 mask = cols - c >= 16 ? 0xffff
                                                          : (__mmask16)((1u << (cols - c)) - 1);
                    __m512 v = _mm512_load_ps(out + r * PACKED_COLS + c);
                    if (bias) v = _mm512_add_ps(v, _mm512_cvtpbh_ps((__m256bh)
                                      _mm256_maskz_loadu_epi16(mask, bias + n0 + c)));
                    const __m256bh rounded = _mm512_cvtneps_pbh(v);
                    const int64_t at = (m + r) * N + n0 + c;
                    if (f32_out)
                        _mm512_mask_storeu_ps((float *)y + at, mask, _mm512_cvtpbh_ps(rounded));
                    else
                        _mm256_mask_storeu_epi16((uint16_t *)y + at, mask, (__m256i)rounded);
                }
        }
    }
    return 0;
}

/* y [M, N] = x [M, K] @ W^T (+ bias [N]), bf16 in and out, W the prepacked weight above (K
 * even); stream: PREFETCH_NTA or PREFETCH_L2, for one row. Returns 0, or -1 for a K it cannot
 * take. */
__attribute__((target("avx512bf16"))) int bf16_packed_linear(
    const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t Kp,
    const uint16_t *bias, int64_t N, uint16_t *y, int stream, int nthreads) {
    return packed_linear(x, M, K, w, Kp, bias, N, y, 0, stream, nthreads);
}

/* bf16_packed_linear's values widened to float32 as it writes them, y [M, N] float32: the
 * LM head's logits, which the sampler reads in float32, without a second pass (at one row
 * over a 150k vocabulary, that pass took ~0.13 ms of the step, the caches cold after the
 * weights' stream). */
__attribute__((target("avx512bf16"))) int bf16_packed_linear_f32(
    const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t Kp,
    const uint16_t *bias, int64_t N, float *y, int stream, int nthreads) {
    return packed_linear(x, M, K, w, Kp, bias, N, y, 1, stream, nthreads);
}

/* Embedding rows from a table held as int8 (w8a8's per-row quantization: bytes q + 128, one
 * float32 scale a row): out [M, E] bf16, row m = (table[ids[m]] - 128) * scales[ids[m]], the
 * float32 product rounded once to bf16, as the torch lookup computes it (index_select, float,
 * sub, mul, to: five ops and ~0.18 ms of a one-stream decode step with the caches cold, for
 * one row). E a multiple of 16. Returns 0, or -1 (nothing written) for an id outside
 * [0, num_rows). */
int embed_int8_rows(const int64_t *ids, int64_t M, const uint8_t *table, const float *scales,
                    int64_t num_rows, int64_t E, uint16_t *out) {
    if (E % 16) return -1;
    for (int64_t m = 0; m < M; m++)
        if (ids[m] < 0 || ids[m] >= num_rows) return -1;
    const __m512 offset = _mm512_set1_ps(128.0f);
    for (int64_t m = 0; m < M; m++) {
        const uint8_t *row = table + ids[m] * E;
        const __m512 scale = _mm512_set1_ps(scales[ids[m]]);
        for (int64_t e = 0; e < E; e += 16) {
            const __m512 q = _mm512_cvtepi32_ps(
                _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + e))));
            store16_bf16(out + m * E + e, _mm512_mul_ps(_mm512_sub_ps(q, offset), scale));
        }
    }
    return 0;
}

/* RMSNorm over rows of bf16, with transformers' Llama rounding: normalize in float32, round to
 * bf16, then multiply by the bf16 weight and round again. One call instead of the eight small
 * torch ops (casts, pow, mean, rsqrt, muls) whose dispatch costs more than the math at decode
 * sizes. x, out [M, H]; weight [H]. */
void rms_norm_bf16(const uint16_t *x, const uint16_t *weight, int64_t M, int64_t H, float eps,
                   uint16_t *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M > 16)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *row = x + m * H;
        float sum = 0.0f;
        __m512 acc = _mm512_setzero_ps();
        int64_t h = 0;
        for (; h + 16 <= H; h += 16) {
            const __m512 v = load16_bf16(row + h);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        sum = _mm512_reduce_add_ps(acc);
        for (; h < H; h++) sum += bf16_to_f32(row[h]) * bf16_to_f32(row[h]);
        const float inv = 1.0f / sqrtf(sum / (float)H + eps);
        for (h = 0; h < H; h++) {
            float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(row[h]) * inv));
            out[m * H + h] = f32_to_bf16(bf16_to_f32(weight[h]) * normed);
        }
    }
}

/* sum_d a[d] * b[d], a float32, b bf16 */
static inline float dot_bf16(const float *a, const uint16_t *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t d = 0;
    for (; d + 16 <= n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), load16_bf16(b + d), acc);
    float sum = _mm512_reduce_add_ps(acc);
    for (; d < n; d++) sum += a[d] * bf16_to_f32(b[d]);
    return sum;
}

/* y[d] += alpha * x[d], x bf16, y float32 */
static inline void axpy_bf16(float alpha, const uint16_t *x, float *y, int64_t n) {
    const __m512 a = _mm512_set1_ps(alpha);
    int64_t d = 0;
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(y + d, _mm512_fmadd_ps(a, load16_bf16(x + d), _mm512_loadu_ps(y + d)));
    for (; d < n; d++) y[d] += alpha * bf16_to_f32(x[d]);
}

/* e^x: 2^n * e^r with |r| <= ln2/2 and a degree-7 Taylor polynomial for e^r (relative error
 * ~2e-8, under float32's 6e-8 step); 0 below -103, inf above ~88.7 */
static inline __m512 exp_ps(__m512 x) {
    static const float inverse_factorial[8] = {1.0f,         1.0f,         0.5f,
                                               1.0f / 6.0f,  1.0f / 24.0f, 1.0f / 120.0f,
                                               1.0f / 720.0f, 1.0f / 5040.0f};
    x = _mm512_max_ps(x, _mm512_set1_ps(-103.0f)); /* below: 0 after scaling */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(inverse_factorial[7]);
    for (int d = 6; d >= 0; d--) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(inverse_factorial[d]));
    return _mm512_scalef_ps(p, n);
}

/* the 16 horizontal sums of v[0..15], in order, as one vector (a transpose-and-add tree:
 * ~45 shuffles and adds for 16 sums instead of ~10 per sum) */
static inline __m512 reduce16_ps(const __m512 v[16]) {
    __m512 w[8], x[4];
    for (int i = 0; i < 8; i++)
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                             _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 z01 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], 0x44),
                               _mm512_shuffle_f32x4(x[0], x[1], 0xEE));
    __m512 z23 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], 0x44),
                               _mm512_shuffle_f32x4(x[2], x[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z01, z23, 0x88),
                         _mm512_shuffle_f32x4(z01, z23, 0xDD));
}

/* partial[j] = the 16-lane partial sums of q . keys[j] for a tile of KEY_TILE keys ([KEY_TILE,
 * D] float32), each over d in order. Always inlined, with D = 64 a constant where it is, so
 * the 16 sums stay in registers and interleave: with a runtime D the compiler kept one sum at
 * a time, a chain of dependent FMAs through memory (~4x the time of this at 64). */
static inline __attribute__((always_inline)) void key_tile_dots(const float *q,
                                                                const float *keys,
                                                                const int64_t D,
                                                                __m512 partial[KEY_TILE]) {
    for (int j = 0; j < KEY_TILE; j++) partial[j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        const __m512 qd = _mm512_loadu_ps(q + d);
        for (int j = 0; j < KEY_TILE; j++)
            partial[j] = _mm512_fmadd_ps(qd, _mm512_loadu_ps(keys + j * D + d), partial[j]);
    }
}

/* acc[g, 0:64] = sum_t probs[g * stride + t] * v_t for `heads` (1 to 4) heads g of one KV
 * head, head size 64, v_t at v_cache + rows[t]: the sums live in registers and each value row
 * is converted once. Always inlined with a constant `heads`, so its loops unroll. The sums are
 * axpy_bf16's, term for term in the same order: the same bits */
static inline __attribute__((always_inline)) void
pv_64(const float *probs, int64_t stride, const uint16_t *v_cache, const int64_t *rows,
      int64_t len, float *acc, const int heads) {
    __m512 sum[4][4];
    for (int g = 0; g < heads; g++)
        for (int c = 0; c < 4; c++) sum[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < len; t++) {
        const uint16_t *v = v_cache + rows[t];
        __m512 row[4];
        for (int c = 0; c < 4; c++) row[c] = load16_bf16(v + 16 * c);
        for (int g = 0; g < heads; g++) {
            const __m512 p = _mm512_set1_ps(probs[g * stride + t]);
            for (int c = 0; c < 4; c++) sum[g][c] = _mm512_fmadd_ps(p, row[c], sum[g][c]);
        }
    }
    for (int g = 0; g < heads; g++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc + g * 64 + 16 * c, sum[g][c]);
}

/* Paged decode attention for bf16 caches: one query token per sequence attending to its whole
 * context through its block table, with the torch decode path's rounding: q.k summed in float32
 * and rounded to bf16 (the bf16 matmul), scaled and soft-maxed in float32, probabilities
 * rounded to bf16, then p.v summed in float32 and rounded. One call per layer instead of a
 * dozen torch ops over a gathered copy of the context.
 *   q, out [S, H, D]; caches [num_blocks, BS, KVH, D]; block_tables [S, W]; seq_lens [S]. */
int paged_decode_attention_bf16(const uint16_t *q, const uint16_t *k_cache,
                                const uint16_t *v_cache, const int32_t *block_tables,
                                const int32_t *seq_lens, int64_t S, int64_t H, int64_t KVH,
                                int64_t D, int64_t BS, int64_t W, float scale, uint16_t *out,
                                int nthreads) {
    const int64_t group = H / KVH;
    int64_t max_len = 0;
    for (int64_t s = 0; s < S; s++) max_len = seq_lens[s] > max_len ? seq_lens[s] : max_len;
    /* scratch per (sequence, kv head): each context position's offset into the caches (int64,
     * taken from the block table once: no division by the block size per key), group rows
     * of scores, and the query/accumulator rows; an even count keeps the offsets aligned */
    const size_t scratch_floats =
        (size_t)((2 * max_len + group * (max_len + 2 * D) + KEY_TILE * D + 1) / 2 * 2);
    float *scratch = malloc(sizeof(float) * scratch_floats * (size_t)(S * KVH));
    if (!scratch) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic) collapse(2)
    for (int64_t s = 0; s < S; s++) {
        for (int64_t kvh = 0; kvh < KVH; kvh++) {
            const int64_t len = seq_lens[s];
            int64_t *rows = (int64_t *)(scratch + (size_t)(s * KVH + kvh) * scratch_floats);
            float *scores = (float *)(rows + max_len);
            float *qf = scores + group * max_len; /* [group, D] */
            float *acc = qf + group * D;          /* [group, D] */
            float *keys = acc + group * D;        /* [KEY_TILE, D]: a tile of keys as float32 */
            for (int64_t g = 0; g < group; g++)
                for (int64_t d = 0; d < D; d++) {
                    qf[g * D + d] = bf16_to_f32(q[(s * H + kvh * group + g) * D + d]);
                    acc[g * D + d] = 0.0f;
                }
            const int32_t *table = block_tables + s * W;
            for (int64_t t = 0, block = 0, offset = 0; t < len; t++) { /* rows[t]: key t's */
                rows[t] = (((int64_t)table[block] * BS + offset) * KVH + kvh) * D;
                if (++offset == BS) offset = 0, block++;
            }
            int64_t t = 0;
            if (D % 16 == 0) /* 16 keys at a time: converted once, summed by one reduce16 */
                for (; t + KEY_TILE <= len; t += KEY_TILE) {
                    /* the context sits in scattered blocks, cold in DRAM at one stream (the
                     * weights streamed past since the last step): the next tile's keys into
                     * L1, this tile's values into L2 for the p.v pass. In the model (int4, one
                     * stream, ~300-token contexts): 27-30 -> 23-29 us a layer; with the
                     * context already in cache it costs ~7% */
                    for (int j = 0; j < KEY_TILE; j++) {
                        const int64_t next = t + KEY_TILE + j;
                        if (next < len) {
                            const char *nk = (const char *)(k_cache + rows[next]);
                            for (int64_t line = 0; line < D * 2; line += 64)
                                _mm_prefetch(nk + line, _MM_HINT_T0);
                        }
                        const char *cv = (const char *)(v_cache + rows[t + j]);
                        for (int64_t line = 0; line < D * 2; line += 64)
                            _mm_prefetch(cv + line, _MM_HINT_T1);
                    }
                    for (int j = 0; j < KEY_TILE; j++) {
                        const uint16_t *k = k_cache + rows[t + j];
                        for (int64_t d = 0; d < D; d += 16)
                            _mm512_storeu_ps(keys + j * D + d, load16_bf16(k + d));
                    }
                    for (int64_t g = 0; g < group; g++) {
                        __m512 partial[KEY_TILE];
                        if (D == 64) /* a constant head size: the 16 sums in registers */
                            key_tile_dots(qf + g * D, keys, 64, partial);
                        else
                            key_tile_dots(qf + g * D, keys, D, partial);
                        _mm512_storeu_ps(scores + g * max_len + t,
                                         _mm512_mul_ps(round_bf16_ps(reduce16_ps(partial)),
                                                       _mm512_set1_ps(scale)));
                    }
                }
            for (; t < len; t++) {
                const uint16_t *k = k_cache + rows[t];
                for (int64_t g = 0; g < group; g++) {
                    const float dot = dot_bf16(qf + g * D, k, D);
                    scores[g * max_len + t] = bf16_to_f32(f32_to_bf16(dot)) * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *row = scores + g * max_len;
                const int64_t vec_len = len / 16 * 16;
                __m512 vtop = _mm512_set1_ps(-INFINITY);
                for (t = 0; t < vec_len; t += 16) vtop = _mm512_max_ps(vtop, _mm512_loadu_ps(row + t));
                float top = _mm512_reduce_max_ps(vtop);
                for (t = vec_len; t < len; t++) top = row[t] > top ? row[t] : top;
                __m512 vsum = _mm512_setzero_ps();
                for (t = 0; t < vec_len; t += 16) {
                    __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(row + t), _mm512_set1_ps(top)));
                    _mm512_storeu_ps(row + t, e);
                    vsum = _mm512_add_ps(vsum, e);
                }
                float total = _mm512_reduce_add_ps(vsum);
                for (t = vec_len; t < len; t++) {
                    row[t] = expf(row[t] - top);
                    total += row[t];
                }
                const float inv = 1.0f / total;
                for (t = 0; t < vec_len; t += 16)
                    _mm512_storeu_ps(row + t, round_bf16_ps(_mm512_mul_ps(_mm512_loadu_ps(row + t),
                                                                          _mm512_set1_ps(inv))));
                for (t = vec_len; t < len; t++) row[t] = bf16_to_f32(f32_to_bf16(row[t] * inv));
            }
            if (D == 64) /* the common head size: up to 4 heads' sums stay in registers (7
                          * query heads a KV head in Qwen2.5-0.5B: 4, then 3) */
                for (int64_t g0 = 0; g0 < group; g0 += 4) {
                    const float *p = scores + g0 * max_len;
                    switch (group - g0) { /* a constant count each, for pv_64's unrolling */
                    case 1: pv_64(p, max_len, v_cache, rows, len, acc + g0 * D, 1); break;
                    case 2: pv_64(p, max_len, v_cache, rows, len, acc + g0 * D, 2); break;
                    case 3: pv_64(p, max_len, v_cache, rows, len, acc + g0 * D, 3); break;
                    default: pv_64(p, max_len, v_cache, rows, len, acc + g0 * D, 4);
                    }
                }
            else
                for (t = 0; t < len; t++) {
                    const uint16_t *v = v_cache + rows[t];
                    for (int64_t g = 0; g < group; g++)
                        axpy_bf16(scores[g * max_len + t], v, acc + g * D, D);
                }
            for (int64_t g = 0; g < group; g++)
                for (int64_t d = 0; d < D; d++)
                    out[(s * H + kvh * group + g) * D + d] = f32_to_bf16(acc[g * D + d]);
        }
    }
    free(scratch);
    return 0;
}

/* Rotate-half RoPE on bf16 rows with torch's bf16 rounding (rotary.apply_rotary:
 * x * cos + roll(x) * sin, each product and the sum rounded to bf16): x [T, heads, D] with
 * `row_stride` elements between tokens (q and k as a view into the fused qkv output), cos and
 * sin [T, D] bf16 (sin carrying the signs of the swapped half), out [T, heads, D] contiguous.
 * One call instead of four torch ops and their temporaries. D a multiple of 32. */
void rope_bf16(const uint16_t *x, int64_t T, int64_t heads, int64_t D, int64_t row_stride,
               const uint16_t *cos, const uint16_t *sin, uint16_t *out, int nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T * heads > 256)
    for (int64_t th = 0; th < T * heads; th++) {
        const int64_t t = th / heads, h = th % heads;
        const uint16_t *row = x + t * row_stride + h * D;
        uint16_t *dst = out + th * D;
        for (int64_t d = 0; d < D; d += 16) {
            /* roll by half: position d reads d + half in the first half, d - half after */
            const int64_t src = d < half ? d + half : d - half;
            const __m512 a = round_bf16_ps(_mm512_mul_ps(load16_bf16(row + d), load16_bf16(cos + t * D + d)));
            const __m512 b = round_bf16_ps(_mm512_mul_ps(load16_bf16(row + src), load16_bf16(sin + t * D + d)));
            store16_bf16(dst + d, _mm512_add_ps(a, b));
        }
    }
}

/* out[m] = argmax of row m of x [M, N] float32, as torch.argmax: the first index of the
 * largest value, or of the first NaN where a row has one. Greedy sampling's pick: one call
 * where chunked_argmax (engine/sampler.py) makes six torch ops, each ~20-40 us at one stream
 * because the weights streamed through the caches just before evicted what they touch. */
void argmax_rows_f32(const float *x, int64_t M, int64_t N, int64_t *out) {
    for (int64_t m = 0; m < M; m++) {
        const float *row = x + m * N;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_at = _mm512_set1_epi32(0), at = _mm512_setr_epi32(
            0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __mmask16 nan = 0;
        int64_t n = 0;
        for (; n + 16 <= N && n + 16 <= INT32_MAX; n += 16) {
            const __m512 v = _mm512_loadu_ps(row + n);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            const __mmask16 greater = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
            best = _mm512_mask_mov_ps(best, greater, v);
            best_at = _mm512_mask_mov_epi32(best_at, greater, at);
            at = _mm512_add_epi32(at, _mm512_set1_epi32(16));
        }
        int64_t index = 0;
        float top = -INFINITY;
        if (nan) {
            index = -1;
            n = 0; /* the first NaN: scan again */
        } else if (n) { /* each lane keeps its first largest: the smallest index among ties */
            float lanes[16];
            int32_t lane_at[16];
            _mm512_storeu_ps(lanes, best);
            _mm512_storeu_si512(lane_at, best_at);
            top = lanes[0];
            index = lane_at[0];
            for (int l = 1; l < 16; l++)
                if (lanes[l] > top || (lanes[l] == top && lane_at[l] < index)) {
                    top = lanes[l];
                    index = lane_at[l];
                }
        }
        for (; n < N; n++) {
            const float v = row[n];
            if (v != v) {
                index = n;
                break;
            }
            if (v > top) { /* a row of -inf keeps index 0 */
                top = v;
                index = n;
            }
        }
        out[m] = index; /* >= 0: where a NaN was seen, the scan found it */
    }
}

/* SwiGLU on a fused [M, 2I] gate|up row of bf16: out = bf16(bf16(silu(gate)) * up), the
 * rounding of torch's bf16 `F.silu(gate) * up`, in one pass instead of two ops and their
 * intermediate tensors. */
void silu_and_mul_bf16(const uint16_t *gate_up, int64_t M, int64_t I, uint16_t *out,
                       int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * I > 65536)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *gate = gate_up + m * 2 * I, *up = gate + I;
        uint16_t *row = out + m * I;
        int64_t i = 0;
        for (; i + 16 <= I; i += 16) {
            const __m512 g = load16_bf16(gate + i);
            const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
            const __m512 silu = round_bf16_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            store16_bf16(row + i, _mm512_mul_ps(silu, load16_bf16(up + i)));
        }
        for (; i < I; i++) {
            const float g = bf16_to_f32(gate[i]);
            const float silu = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            row[i] = f32_to_bf16(silu * bf16_to_f32(up[i]));
        }
    }
}

/* ---- Prefill attention with AVX512-BF16 dot products (FlashAttention's tiling) ----
 *
 * One sequence's chunk of query_len new tokens, the last ones of its seq_len-token context
 * (their K/V already written to the paged cache): query i sits at p = seq_len - query_len + i
 * and sees keys [0, p]. Per KV head, its group's query heads are folded with the positions
 * into rows (row = i * group + g), so a tile of rows shares every K/V read. K and V are first
 * repacked from the cache into the pair-interleaved layout vdpbf16ps takes (each 32-bit lane
 * holds two bf16 of adjacent reduction indices: K as [16 keys][2 dims] per dim pair, V as
 * [16 dims][2 keys] per key pair), once per call; then every tile walks the key blocks it can
 * see with an online softmax: scores in float32 registers (no score matrix is stored), the
 * running max and sum per row, the output rescaled when the max grows (lazily: see
 * PF_LAZY_LOG2). Probabilities are rounded to bf16 for the p.v products (as torch's bf16 flash
 * attention does), the sums are float32, the output is rounded once. Key blocks past a tile's
 * last visible key are never read: causal work is about half the square. */
#define PF_KEYS 64 /* keys per softmax step: four 16-lane score vectors per row */

#define PF_MAX_ROWS 6 /* query rows per tile: 6 at head size 64, 2 at 128 (32 registers) */
/* The running max moves only when a score passes it by 2^PF_LAZY_LOG2 in probability: the
 * probabilities stay below 256 (well inside float32 sums and bf16's range), and most key
 * blocks skip the max reduction and the output rescale. */
#define PF_LAZY_LOG2 8.0f

/* 2^x to ~7.5e-5 relative (degree 3, minimax on [-1/2, 1/2]; a degree-4 Taylor is 5.6e-5 for
 * one more FMA): the attention probabilities are rounded to bf16 (4e-3) before they are used.
 * The softmax is ~8% of the kernel's time, and the dropped FMA 1.5-3% (same-process A/B, 4k
 * context in 1024-token chunks). Taking 2^x lets the caller fold the softmax scale and log2(e)
 * into one fused multiply-subtract. Lanes of x that are not finite give NaN and must be masked
 * by the caller. */
static inline __m512 exp2_probability_ps(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(0.05517167f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.24261115f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.69326099f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.99992807f));
    return _mm512_scalef_ps(p, n);
}

typedef struct {
    const uint16_t *q;
    const uint32_t *kp; /* per KV head: [ctx_pad / 16][D / 2][16] pairs of dims */
    const uint32_t *vp; /* per KV head: [ctx_pad / 2][D] pairs of keys */
    int64_t H, group, D, first_pos; /* first_pos: the chunk's first query position */
    float scale, scale_log2e; /* scale_log2e = scale * log2(e) */
    float lazy;               /* PF_LAZY_LOG2 in raw (unscaled) score units */
    uint16_t *out;
} prefill_args;

/* A row's online-softmax state between stretches of keys: its output sums, its exp-sum per
 * lane and its running max in raw score units (aligned: the output sums go in and out of
 * registers at every key block). */
typedef struct {
    _Alignas(64) float o[128];
    float lsum[16];
    float m;
} prefill_state;

/* Rows [r0, r0 + MR) of one KV head (rows past the end repeat the last and are not stored)
 * over the key blocks [b_begin, b_end) they can see, from and back to their states. */
static inline __attribute__((always_inline, target("avx512bf16"))) void prefill_tile(
    const prefill_args *a, int64_t kvh, int64_t r0, int64_t rows_total, int64_t b_begin,
    int64_t b_end, prefill_state *state, const int MR, const int D) {
    const int64_t H = a->H, group = a->group;
    const uint16_t *qrow[PF_MAX_ROWS];
    int64_t limit[PF_MAX_ROWS]; /* the last key each row sees */
    int64_t last = 0, first_masked = INT64_MAX;
    for (int r = 0; r < MR; r++) {
        const int64_t row = r0 + r < rows_total ? r0 + r : rows_total - 1;
        const int64_t i = row / group, g = row % group;
        qrow[r] = a->q + (i * H + kvh * group + g) * D;
        limit[r] = a->first_pos + i;
        last = limit[r] > last ? limit[r] : last;
        first_masked = limit[r] + 1 < first_masked ? limit[r] + 1 : first_masked;
    }
    if (last / PF_KEYS + 1 < b_end) b_end = last / PF_KEYS + 1;
    if (b_begin >= b_end) return;
    enum { SV = PF_KEYS / 16 }; /* score vectors per row */
    const __m512 scale_log2e = _mm512_set1_ps(a->scale_log2e);
    for (int64_t b = b_begin; b < b_end; b++) {
        const int64_t j0 = b * PF_KEYS;
        /* raw scores q.k: MR x SV independent sums (24 at head size 64), so the dot-product
         * units never wait on one sum's latency */
        __m512 s[PF_MAX_ROWS][SV];
        for (int r = 0; r < MR; r++)
            for (int h = 0; h < SV; h++) s[r][h] = _mm512_setzero_ps();
        const uint32_t *kb = a->kp + (j0 / 16) * (D / 2) * 16;
        for (int p = 0; p < D / 2; p++) {
            __m512bh kv[SV];
            for (int h = 0; h < SV; h++)
                kv[h] = (__m512bh)_mm512_loadu_si512((const void *)(kb + (h * (D / 2) + p) * 16));
            for (int r = 0; r < MR; r++) {
                uint32_t pair;
                memcpy(&pair, qrow[r] + 2 * p, sizeof pair);
                const __m512bh qv = (__m512bh)_mm512_set1_epi32((int)pair);
                for (int h = 0; h < SV; h++) s[r][h] = _mm512_dpbf16_ps(s[r][h], qv, kv[h]);
            }
        }
        const int masked = j0 + PF_KEYS > first_masked;
        /* probabilities as bf16, key pairs in 32-bit lanes: pairs[r][t] = keys 2t, 2t+1 */
        uint32_t pairs[PF_MAX_ROWS][PF_KEYS / 2];
        float alpha[PF_MAX_ROWS];
        int rescale = 0;
        for (int r = 0; r < MR; r++) {
            __mmask16 keep[SV];
            __m512 top = _mm512_set1_ps(-INFINITY);
            for (int h = 0; h < SV; h++) {
                keep[h] = 0xffff;
                if (masked) {
                    const int64_t visible = limit[r] + 1 - (j0 + 16 * h); /* lanes that see */
                    keep[h] = visible >= 16 ? 0xffff
                              : visible <= 0 ? 0 : (__mmask16)((1u << visible) - 1u);
                }
                top = _mm512_mask_max_ps(top, keep[h], top, s[r][h]);
            }
            /* the state stays in memory between blocks, leaving the registers to the score
             * sums; a row that sees none of these keys (top -inf) adds zeros */
            __m512 lsum = _mm512_loadu_ps(state[r].lsum);
            alpha[r] = 1.0f;
            if (_mm512_cmp_ps_mask(top, _mm512_set1_ps(state[r].m + a->lazy), _CMP_GT_OQ)) {
                /* what was summed under the old max shrinks (e^-inf = 0 on the first block) */
                const float block_max = _mm512_reduce_max_ps(top);
                alpha[r] = _mm512_cvtss_f32(
                    exp_ps(_mm512_set1_ps(a->scale * (state[r].m - block_max))));
                lsum = _mm512_mul_ps(lsum, _mm512_set1_ps(alpha[r]));
                state[r].m = block_max;
                rescale = 1;
            }
            /* p = 2^(s * scale * log2(e) - m * scale * log2(e)) = e^(scale * (s - m)) */
            const __m512 m_scaled = _mm512_set1_ps(state[r].m * a->scale_log2e);
            __m512 prob[SV];
            for (int h = 0; h < SV; h++) {
                prob[h] = _mm512_maskz_mov_ps(
                    keep[h], exp2_probability_ps(_mm512_fmsub_ps(s[r][h], scale_log2e, m_scaled)));
                lsum = _mm512_add_ps(lsum, prob[h]);
            }
            _mm512_storeu_ps(state[r].lsum, lsum);
            for (int h = 0; h < SV / 2; h++)
                _mm512_storeu_si512((void *)(pairs[r] + 16 * h),
                                    (__m512i)_mm512_cvtne2ps_pbh(prob[2 * h + 1], prob[2 * h]));
        }
        /* the output sums come in from the state for this block only (registers are for the
         * scores above), rescaled only if a max moved, and each value row is loaded once for
         * the whole tile */
        __m512 o[PF_MAX_ROWS][8]; /* [MR][D / 16] */
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < D / 16; c++)
                o[r][c] = _mm512_loadu_ps(state[r].o + 16 * c);
        if (rescale)
            for (int r = 0; r < MR; r++)
                for (int c = 0; c < D / 16; c++)
                    o[r][c] = _mm512_mul_ps(o[r][c], _mm512_set1_ps(alpha[r]));
        const uint32_t *vb = a->vp + (j0 / 2) * D;
        for (int t = 0; t < PF_KEYS / 2; t++) {
            __m512bh vv[8];
            for (int c = 0; c < D / 16; c++)
                vv[c] = (__m512bh)_mm512_loadu_si512((const void *)(vb + t * D + 16 * c));
            for (int r = 0; r < MR; r++) {
                const __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pairs[r][t]);
                for (int c = 0; c < D / 16; c++) o[r][c] = _mm512_dpbf16_ps(o[r][c], pv, vv[c]);
            }
        }
        for (int r = 0; r < MR; r++)
            for (int c = 0; c < D / 16; c++) _mm512_storeu_ps(state[r].o + 16 * c, o[r][c]);
    }
}

/* A group of PF_GROUP_ROWS rows of one KV head: the keys go past in stretches of
 * PF_STRETCH_KEYS (their packed K and V, 64 KB at head size 64, stay in L2 while every tile of
 * the group reads them; a whole 8k context's 2 MB would come from L3 for each tile). */
#define PF_GROUP_ROWS 48
#define PF_STRETCH_KEYS 256

static inline __attribute__((always_inline, target("avx512bf16"))) void prefill_group(
    const prefill_args *a, int64_t kvh, int64_t g0, int64_t rows_total, int64_t seq_len,
    prefill_state *state, const int D) {
    const int MR = D == 64 ? PF_MAX_ROWS : 2;
    const int64_t g_end = g0 + PF_GROUP_ROWS < rows_total ? g0 + PF_GROUP_ROWS : rows_total;
    for (int64_t r = 0; r < g_end - g0; r++) {
        memset(&state[r], 0, sizeof state[r]);
        state[r].m = -INFINITY;
    }
    const int64_t nblocks = (seq_len + PF_KEYS - 1) / PF_KEYS;
    const int64_t step = PF_STRETCH_KEYS / PF_KEYS;
    for (int64_t b0 = 0; b0 < nblocks; b0 += step) {
        const int64_t b1 = b0 + step < nblocks ? b0 + step : nblocks;
        for (int64_t r0 = g0; r0 < g_end; r0 += MR)
            prefill_tile(a, kvh, r0, g_end, b0, b1, state + (r0 - g0), MR, D);
    }
    for (int64_t row = g0; row < g_end; row++) {
        const prefill_state *st = &state[row - g0];
        const int64_t i = row / a->group, g = row % a->group;
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(_mm512_loadu_ps(st->lsum)));
        uint16_t *dst = a->out + (i * a->H + kvh * a->group + g) * D;
        for (int c = 0; c < D / 16; c++)
            store16_bf16(dst + 16 * c, _mm512_mul_ps(_mm512_loadu_ps(st->o + 16 * c), inv));
    }
}

/* one function per head size: each gets the registers to itself */
static __attribute__((noinline, target("avx512bf16"))) void prefill_group_64(
    const prefill_args *a, int64_t kvh, int64_t g0, int64_t rows_total, int64_t seq_len,
    prefill_state *state) {
    prefill_group(a, kvh, g0, rows_total, seq_len, state, 64);
}

static __attribute__((noinline, target("avx512bf16"))) void prefill_group_128(
    const prefill_args *a, int64_t kvh, int64_t g0, int64_t rows_total, int64_t seq_len,
    prefill_state *state) {
    prefill_group(a, kvh, g0, rows_total, seq_len, state, 128);
}

/* K of positions [0, len) of one KV head as [len_pad / 16][D / 2][16] dim pairs and V as
 * [len_pad / 2][D] key pairs, zero past len. */
static void pack_kv(const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
                    int64_t len, int64_t BS, int64_t KVH, int64_t kvh, int64_t D, int64_t block16,
                    uint32_t *kp, uint32_t *vp) {
    const int64_t j0 = block16 * 16;
    uint32_t *kdst = kp + block16 * (D / 2) * 16;
    for (int64_t j = 0; j < 16; j++) {
        const int64_t t = j0 + j;
        const uint16_t *k = NULL, *v = NULL;
        if (t < len) {
            const int64_t slot = (int64_t)table[t / BS] * BS + t % BS;
            k = k_cache + (slot * KVH + kvh) * D;
            v = v_cache + (slot * KVH + kvh) * D;
        }
        for (int64_t p = 0; p < D / 2; p++) {
            uint32_t pair = 0;
            if (k) memcpy(&pair, k + 2 * p, sizeof pair);
            kdst[p * 16 + j] = pair;
        }
        uint16_t *vdst = (uint16_t *)(vp + (t / 2) * D) + (t % 2);
        for (int64_t d = 0; d < D; d++) vdst[2 * d] = v ? v[d] : 0;
    }
}

/* q, out [query_len, H, D] bf16; caches [num_blocks, BS, KVH, D] bf16; table: the sequence's
 * block ids. D must be 64 or 128. Returns 0, -1 when scratch memory ran out, -2 for a D it
 * does not handle. */
__attribute__((target("avx512bf16"))) int paged_prefill_attention_bf16(
    const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
    int64_t seq_len, int64_t query_len, int64_t H, int64_t KVH, int64_t D, int64_t BS,
    float scale, uint16_t *out, int nthreads) {
    if (D != 64 && D != 128) return -2;
    const int64_t len_pad = (seq_len + PF_KEYS - 1) / PF_KEYS * PF_KEYS;
    const size_t per_head = (size_t)(len_pad * D / 2); /* uint32 pairs of K (and of V) */
    uint32_t *packed = aligned_alloc(64, sizeof(uint32_t) * per_head * 2 * (size_t)KVH);
    if (!packed) return -1;
    const int64_t group = H / KVH, rows_total = query_len * group;
    const int64_t groups = (rows_total + PF_GROUP_ROWS - 1) / PF_GROUP_ROWS;
    const float scale_log2e = scale * 1.44269504088896341f;
    prefill_args args = {q,     NULL,        NULL,        H, group, D, seq_len - query_len,
                         scale, scale_log2e, PF_LAZY_LOG2 / scale_log2e, out};
#pragma omp parallel num_threads(nthreads)
    {
        prefill_state state[PF_GROUP_ROWS];
#pragma omp for schedule(static) collapse(2)
        for (int64_t kvh = 0; kvh < KVH; kvh++)
            for (int64_t b = 0; b < len_pad / 16; b++) /* a KV head's K, then its V */
                pack_kv(k_cache, v_cache, table, seq_len, BS, KVH, kvh, D, b,
                        packed + (size_t)kvh * 2 * per_head,
                        packed + (size_t)kvh * 2 * per_head + per_head);
        /* later rows see more keys: dynamic, largest first */
#pragma omp for schedule(dynamic, 1) collapse(2)
        for (int64_t kvh = 0; kvh < KVH; kvh++)
            for (int64_t t = groups - 1; t >= 0; t--) {
                prefill_args mine = args;
                mine.kp = packed + (size_t)kvh * 2 * per_head;
                mine.vp = mine.kp + per_head;
                if (D == 64)
                    prefill_group_64(&mine, kvh, t * PF_GROUP_ROWS, rows_total, seq_len, state);
                else
                    prefill_group_128(&mine, kvh, t * PF_GROUP_ROWS, rows_total, seq_len, state);
            }
    }
    free(packed);
    return 0;
}

/* ---- A Llama-family decode step in one call ----
 *
 * The decoder layers of a decode step (one new token per sequence, M rows) run the kernels
 * above in the order and with the roundings of the torch modules (engine/models/llama.py):
 * RMSNorm, the qkv matmul (+ bias), RoPE on q and k, the new K/V into the paged caches,
 * decode attention, o_proj, the residual add, RMSNorm, gate_up, SwiGLU, down, the residual
 * add; every intermediate rounded to bf16 where the module's output is bf16, so the hidden
 * states come out bit-identical. What it saves is the Python between the kernels: about 150
 * us a layer at one row, a third of an int4 decode step of the default model. The caller
 * (engine/models/native_decode.py) checks that every layer has this shape. */
typedef struct {
    int64_t bits; /* 4: int4_gemm_q8 over (w, s, z); 8: w8a8_gemm over (w, s); 16:
                     bf16_packed_linear over w */
    const void *w; /* the column copy: int4_pack_columns' nibbles, or w8_pack_columns' bytes;
                      bf16: oneDNN's prepacked weight */
    const void *s; /* int4: float16 scales; int8: float32 row scales; bf16: unused */
    const void *z; /* int4: float16 zero points; int8, bf16: unused */
    const void *bias; /* int4: [N] bf16, added after the rounding; int8: [N] float32, inside;
                         bf16: [N] bf16, inside */
    int64_t N, K, group_size; /* bf16: group_size is the padded K of the prepacked rows */
} qlinear_t;

typedef struct {
    const uint16_t *input_norm, *post_norm; /* [E] bf16 */
    float input_eps, post_eps;
    qlinear_t qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache; /* [num_blocks, BS, KVH, D] bf16 */
} q_decoder_layer_t;

/* y [M, N] = x [M, K] @ W^T (+ bias), bf16 in and out, with the roundings of the module's
 * call (w4a16.linear or w8a8.linear). Returns the kernel's status. */
static int q_linear(const qlinear_t *l, const uint16_t *x, int64_t M, uint16_t *y, int stream,
                    int nthreads) {
    if (l->bits == 16)
        return bf16_packed_linear(x, M, l->K, (const uint16_t *)l->w, l->group_size,
                                  (const uint16_t *)l->bias, l->N, y, stream, nthreads);
    if (l->bits == 8)
        return w8a8_gemm(x, M, l->K, (const uint8_t *)l->w, (const float *)l->s,
                         (const float *)l->bias, l->N, y, nthreads);
    const int status = int4_gemm_q8(x, M, l->K, (const uint32_t *)l->w, (const uint16_t *)l->s,
                                    (const uint16_t *)l->z, l->N, l->group_size, y, 1, stream,
                                    nthreads);
    if (status != 0 || !l->bias) return status;
    const uint16_t *bias = (const uint16_t *)l->bias; /* torch's bf16 `out += bias` */
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < l->N; n++)
            y[m * l->N + n] = f32_to_bf16(bf16_to_f32(y[m * l->N + n]) + bf16_to_f32(bias[n]));
    return 0;
}

/* h += x over n bf16 values, rounded as torch's bf16 add */
static void add_bf16(uint16_t *h, const uint16_t *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        store16_bf16(h + i, _mm512_add_ps(load16_bf16(h + i), load16_bf16(x + i)));
    for (; i < n; i++) h[i] = f32_to_bf16(bf16_to_f32(h[i]) + bf16_to_f32(x[i]));
}

/* The residual add and the next RMSNorm of a decode step, hidden [M, E] += delta, then
 * out = RMSNorm(hidden) with `weight` (none where weight is NULL: the last layer, whose norm
 * is the model's). */
void add_rms_norm_bf16(uint16_t *hidden, const uint16_t *delta, const uint16_t *weight,
                       int64_t M, int64_t E, float eps, uint16_t *out, int nthreads) {
    add_bf16(hidden, delta, M * E);
    if (weight) rms_norm_bf16(hidden, weight, M, E, eps, out, nthreads);
}

/* A decode step's attention between the qkv and o matmuls: RoPE on q and k of the fused
 * qkv rows [M, (H + 2 KVH) D], the new K/V into the caches at `slots` (checked by the
 * caller), decode attention into attn [M, H D]. qk [M, (H + KVH) D] and q [M, H D]: scratch.
 * Returns paged_decode_attention_bf16's status. */
static int decode_attention_step(const uint16_t *qkv, int64_t M, int64_t H, int64_t KVH,
                                 int64_t D, const uint16_t *cos, const uint16_t *sin,
                                 const int64_t *slots, uint16_t *k_cache, uint16_t *v_cache,
                                 const int32_t *block_tables, const int32_t *lens, int64_t BS,
                                 int64_t W, float scale, uint16_t *qk, uint16_t *q,
                                 uint16_t *attn, int nthreads) {
    const int64_t qkv_n = (H + 2 * KVH) * D, qk_n = (H + KVH) * D;
    rope_bf16(qkv, M, H + KVH, D, qkv_n, cos, sin, qk, nthreads);
    const size_t row_bytes = sizeof(uint16_t) * (size_t)(KVH * D);
    for (int64_t m = 0; m < M; m++) {
        memcpy(k_cache + slots[m] * KVH * D, qk + m * qk_n + H * D, row_bytes);
        memcpy(v_cache + slots[m] * KVH * D, qkv + m * qkv_n + qk_n, row_bytes);
        memcpy(q + m * H * D, qk + m * qk_n, sizeof(uint16_t) * (size_t)(H * D));
    }
    return paged_decode_attention_bf16(q, k_cache, v_cache, block_tables, lens, M, H, KVH, D,
                                       BS, W, scale, attn, nthreads);
}

/* hidden [M, E] bf16, in and out: the embedded tokens in, the last layer's output out (with
 * the final norm applied, where one is given).
 * H query heads and KVH KV heads of size D (a multiple of 32, for rope_bf16); I: the MLP's
 * intermediate size; cos, sin [M, D] (apply_rotary's factors); slots [M] (< num_slots); the
 * decode plan's block tables [M, W] and context lengths [M]; final_norm [E] (or NULL): the
 * model's final RMSNorm, applied to `hidden` in place after the last layer; stream: the
 * matmuls' prefetch kind for weights read once (prefetch_line). Returns 0, Q_DECODE_BAD_SLOT
 * when a slot is outside the cache (before anything is written), Q_DECODE_NO_MEMORY when its
 * scratch could not be allocated, or a kernel's own negative status. */
#define Q_DECODE_BAD_SLOT (-100)
#define Q_DECODE_NO_MEMORY (-101)
int llama_decode_layers(const q_decoder_layer_t *layers, int64_t L, uint16_t *hidden,
                           int64_t M, int64_t E, int64_t H, int64_t KVH, int64_t D, int64_t I,
                           const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                           int64_t num_slots, const int32_t *block_tables, const int32_t *lens,
                           int64_t BS, int64_t W, float scale, const uint16_t *final_norm,
                           float final_eps, int stream, int nthreads) {
    for (int64_t m = 0; m < M; m++)
        if (slots[m] < 0 || slots[m] >= num_slots) return Q_DECODE_BAD_SLOT;
    const int64_t qkv_n = (H + 2 * KVH) * D, qk_n = (H + KVH) * D;
    const int64_t widest = qkv_n > 2 * I ? qkv_n : 2 * I;
    uint16_t *x = malloc(sizeof(uint16_t) * (size_t)(M * E));       /* normed input */
    uint16_t *wide = malloc(sizeof(uint16_t) * (size_t)(M * widest)); /* qkv, then gate_up */
    uint16_t *qk = malloc(sizeof(uint16_t) * (size_t)(M * qk_n));   /* q and k after RoPE */
    uint16_t *q = malloc(sizeof(uint16_t) * (size_t)(M * H * D));   /* q, contiguous */
    uint16_t *attn = malloc(sizeof(uint16_t) * (size_t)(M * (H * D > I ? H * D : I)));
    uint16_t *out = malloc(sizeof(uint16_t) * (size_t)(M * E));     /* o_proj, then down */
    int status = (x && wide && qk && q && attn && out) ? 0 : Q_DECODE_NO_MEMORY;
    for (int64_t l = 0; l < L && status == 0; l++) {
        const q_decoder_layer_t *layer = &layers[l];
        rms_norm_bf16(hidden, layer->input_norm, M, E, layer->input_eps, x, nthreads);
        if ((status = q_linear(&layer->qkv, x, M, wide, stream, nthreads)) != 0) break;
        status = decode_attention_step(wide, M, H, KVH, D, cos, sin, slots, layer->k_cache,
                                       layer->v_cache, block_tables, lens, BS, W, scale, qk, q,
                                       attn, nthreads);
        if (status != 0 || (status = q_linear(&layer->o, attn, M, out, stream, nthreads)) != 0)
            break;
        add_bf16(hidden, out, M * E);
        rms_norm_bf16(hidden, layer->post_norm, M, E, layer->post_eps, x, nthreads);
        if ((status = q_linear(&layer->gate_up, x, M, wide, stream, nthreads)) != 0) break;
        silu_and_mul_bf16(wide, M, I, attn, nthreads);
        if ((status = q_linear(&layer->down, attn, M, out, stream, nthreads)) != 0) break;
        add_bf16(hidden, out, M * E);
    }
    if (status == 0 && final_norm) /* in place: each row's sum is taken before it is written */
        rms_norm_bf16(hidden, final_norm, M, E, final_eps, hidden, nthreads);
    free(x);
    free(wide);
    free(qk);
    free(q);
    free(attn);
    free(out);
    return status;
}

/* decode_attention_step for the bf16 stack, whose matmuls torch runs (oneDNN): the slots
 * checked, the scratch allocated here. Returns 0, Q_DECODE_BAD_SLOT, Q_DECODE_NO_MEMORY or the
 * attention kernel's status. */
int llama_decode_attention(const uint16_t *qkv, int64_t M, int64_t H, int64_t KVH, int64_t D,
                           const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                           int64_t num_slots, uint16_t *k_cache, uint16_t *v_cache,
                           const int32_t *block_tables, const int32_t *lens, int64_t BS,
                           int64_t W, float scale, uint16_t *attn, int nthreads) {
    for (int64_t m = 0; m < M; m++)
        if (slots[m] < 0 || slots[m] >= num_slots) return Q_DECODE_BAD_SLOT;
    uint16_t *qk = malloc(sizeof(uint16_t) * (size_t)(M * (H + KVH) * D));
    uint16_t *q = malloc(sizeof(uint16_t) * (size_t)(M * H * D));
    int status = Q_DECODE_NO_MEMORY;
    if (qk && q)
        status = decode_attention_step(qkv, M, H, KVH, D, cos, sin, slots, k_cache, v_cache,
                                       block_tables, lens, BS, W, scale, qk, q, attn, nthreads);
    free(qk);
    free(q);
    return status;
}
