/* pagedserve's portable CPU kernels: plain C that the compiler vectorizes for whatever CPU
 * builds it (-O3 -march=native: AVX2, AVX-512, NEON), built by engine/kernels/portable.py.
 * cpu_kernels.c holds the hand-written AVX-512 ones; these need no particular instruction set.
 *
 * Paged decode attention in float32: one query token per sequence attending to its whole
 * context, read in place through the block table. The torch path gathers every context into a
 * fresh [seqs, kv_heads, len, dim] copy per layer and step, which costs more than the
 * attention itself once contexts reach thousands of tokens; here each key and value row is
 * read once, straight from the cache, for all the query heads of its KV head.
 * The arithmetic is the torch path's: q.k summed in float32, scaled, a float32 softmax, then
 * p.v summed in float32 (only the order of the additions differs).
 *   q, out [S, H, D]; caches [num_blocks, BS, KVH, D]; block_tables [S, W]; seq_lens [S]. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^x for x in [-87, 0] (softmax: scores minus their maximum; lower is clamped, its e^x is
 * below float32's smallest normal anyway): 2^n * e^r with |r| <= ln2/2 and a degree-7 Taylor
 * polynomial for e^r (relative error ~2e-8, under float32's 6e-8 step). Plain arithmetic, so
 * the compiler vectorizes the loops that call it, where libm's expf stays one call a value. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const int n = (int)(x * 1.44269504088896341f - 0.5f); /* round to nearest, x <= 0 */
    float r = x - (float)n * 0.693145751953125f;
    r -= (float)n * 1.428606765330187045e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (n + 127) << 23; /* 2^n, n >= -126 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* The new tokens' K and V rows into the paged caches: token t's row of `row_bytes` (its
 * KV heads, contiguous) goes to slot slots[t] of both caches, read from key + t * key_stride
 * and value + t * value_stride (bytes: the rows may be views into a fused qkv output). Any
 * dtype: the rows are copied as bytes. Returns 0, or -1 before writing anything when a slot
 * is outside [0, num_slots). One call for both caches, where torch takes two index_copy_
 * (2.9x the time at a 1,024-token chunk). */
int kv_cache_write(const char *key, int64_t key_stride, const char *value, int64_t value_stride,
                   char *k_cache, char *v_cache, const int64_t *slots, int64_t T,
                   int64_t row_bytes, int64_t num_slots) {
    for (int64_t t = 0; t < T; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return -1;
    for (int64_t t = 0; t < T; t++) {
        memcpy(k_cache + slots[t] * row_bytes, key + t * key_stride, (size_t)row_bytes);
        memcpy(v_cache + slots[t] * row_bytes, value + t * value_stride, (size_t)row_bytes);
    }
    return 0;
}

int paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                               const int32_t *block_tables, const int32_t *seq_lens, int64_t S,
                               int64_t H, int64_t KVH, int64_t D, int64_t BS, int64_t W,
                               float scale, float *out, int nthreads) {
    const int64_t group = H / KVH;
    int64_t max_len = 0;
    for (int64_t s = 0; s < S; s++) max_len = seq_lens[s] > max_len ? seq_lens[s] : max_len;
    /* scratch per (sequence, kv head): group rows of scores, and the accumulator rows */
    const size_t scratch_floats = (size_t)(group * (max_len + D));
    float *scratch = malloc(sizeof(float) * scratch_floats * (size_t)(S * KVH));
    if (!scratch) return -1;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic) collapse(2)
    for (int64_t s = 0; s < S; s++) {
        for (int64_t kvh = 0; kvh < KVH; kvh++) {
            const int64_t len = seq_lens[s];
            const int32_t *table = block_tables + s * W;
            const float *qs = q + (s * H + kvh * group) * D; /* [group, D] */
            float *scores = scratch + (size_t)(s * KVH + kvh) * scratch_floats;
            float *acc = scores + group * max_len; /* [group, D] */
            for (int64_t t = 0; t < len; t++) {
                const float *k = k_cache + (((int64_t)table[t / BS] * BS + t % BS) * KVH + kvh) * D;
                for (int64_t g = 0; g < group; g++) {
                    const float *qg = qs + g * D;
                    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qg[d] * k[d];
                    scores[g * max_len + t] = dot * scale;
                }
            }
            for (int64_t g = 0; g < group; g++) {
                float *row = scores + g * max_len;
                float top = -INFINITY;
                for (int64_t t = 0; t < len; t++) top = row[t] > top ? row[t] : top;
                float total = 0.0f;
#pragma omp simd reduction(+ : total)
                for (int64_t t = 0; t < len; t++) {
                    row[t] = exp_nonpositive(row[t] - top);
                    total += row[t];
                }
                const float inv = 1.0f / total;
#pragma omp simd
                for (int64_t t = 0; t < len; t++) row[t] *= inv;
                float *a = acc + g * D;
                for (int64_t d = 0; d < D; d++) a[d] = 0.0f;
            }
            for (int64_t t = 0; t < len; t++) {
                const float *v = v_cache + (((int64_t)table[t / BS] * BS + t % BS) * KVH + kvh) * D;
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[g * max_len + t];
                    float *a = acc + g * D;
#pragma omp simd
                    for (int64_t d = 0; d < D; d++) a[d] += p * v[d];
                }
            }
            for (int64_t g = 0; g < group; g++)
                for (int64_t d = 0; d < D; d++) out[(s * H + kvh * group + g) * D + d] = acc[g * D + d];
        }
    }
    free(scratch);
    return 0;
}

/* Weight-int4 linear, y = x @ W^T, for a few rows of float32 activations (decode): each packed
 * weight byte is read once for all M rows, and only the bytes are read, an eighth of float32's.
 * W[n, k] = q[n, k] * scale[n, g] - zero_scaled[n, g] with g = k / group_size (w4a16's layout:
 * byte j of a row holds column 2j in its low nibble, 2j + 1 in its high one; scale and zero
 * times scale given in float32). Per group the kernel sums x * q over the group's columns and
 * then applies the scale, minus zero_scaled times the group's sum of x, so the inner loop is a
 * nibble-to-float conversion and a multiply-add. With AVX2 and FMA that loop is written out in
 * intrinsics (the compiler's own vectorization of it ran ~5x slower); elsewhere it is plain C.
 *   x_even, x_odd [M, K / 2]: x's even and odd columns; x_group_sums [M, G];
 *   packed [N, K / 2]; scales, zero_scaled [N, G]; out [M, N]. */
#define INT4_MAX_ROWS 16
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* 16 packed bytes (32 weights) as four vectors of 8 floats: low nibbles of bytes 0-7 and 8-15,
 * high nibbles of bytes 0-7 and 8-15 (so they line up with x_even[j..] and x_odd[j..]). */
static inline void int4_unpack16(const uint8_t *bytes, __m256 *lo0, __m256 *lo1, __m256 *hi0,
                                 __m256 *hi1) {
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i b = _mm_loadu_si128((const __m128i *)bytes);
    const __m128i lo = _mm_and_si128(b, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    *lo0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    *lo1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    *hi0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    *hi1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
/* Rows n0 and n0 + 1 of W for one row of x: two rows at a time give the multiply-adds eight
 * independent chains (the latency of one chain per group was the limit); each group's sums are
 * scaled as vectors, so the one horizontal sum is at the row's end. */
static void int4_two_rows_avx2(const float *x_even, const float *x_odd, const float *x_group_sums,
                               const uint8_t *packed, const float *scales,
                               const float *zero_scaled, int64_t n0, int64_t G, int64_t half,
                               int64_t half_group, float *out) {
    const uint8_t *rows[2] = {packed + n0 * half, packed + (n0 + 1) * half};
    __m256 totals[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float zero_terms[2] = {0.0f, 0.0f};
    for (int64_t g = 0; g < G; g++) {
        const float *xe = x_even + g * half_group, *xo = x_odd + g * half_group;
        __m256 a[2][4];
        for (int r = 0; r < 2; r++)
            for (int i = 0; i < 4; i++) a[r][i] = _mm256_setzero_ps();
        for (int64_t j = 0; j < half_group; j += 16) {
            const __m256 e0 = _mm256_loadu_ps(xe + j), e1 = _mm256_loadu_ps(xe + j + 8);
            const __m256 o0 = _mm256_loadu_ps(xo + j), o1 = _mm256_loadu_ps(xo + j + 8);
            for (int r = 0; r < 2; r++) {
                __m256 lo0, lo1, hi0, hi1;
                int4_unpack16(rows[r] + g * half_group + j, &lo0, &lo1, &hi0, &hi1);
                a[r][0] = _mm256_fmadd_ps(lo0, e0, a[r][0]);
                a[r][1] = _mm256_fmadd_ps(lo1, e1, a[r][1]);
                a[r][2] = _mm256_fmadd_ps(hi0, o0, a[r][2]);
                a[r][3] = _mm256_fmadd_ps(hi1, o1, a[r][3]);
            }
        }
        for (int r = 0; r < 2; r++) {
            const int64_t at = (n0 + r) * G + g;
            const __m256 sum = _mm256_add_ps(_mm256_add_ps(a[r][0], a[r][1]),
                                             _mm256_add_ps(a[r][2], a[r][3]));
            totals[r] = _mm256_fmadd_ps(sum, _mm256_set1_ps(scales[at]), totals[r]);
            zero_terms[r] += zero_scaled[at] * x_group_sums[g];
        }
    }
    for (int r = 0; r < 2; r++) out[n0 + r] = hsum256(totals[r]) - zero_terms[r];
}

/* One row n of W for M rows of x (M a multiple of 4), four x rows at a time (a low and a high
 * chain each, eight in all), from the group's values unpacked once into low[] and high[]. */
static void int4_row_many_avx2(const float *x_even, const float *x_odd,
                               const float *x_group_sums, const uint8_t *row,
                               const float *scales, const float *zero_scaled, int64_t n,
                               int64_t M, int64_t N, int64_t G, int64_t half,
                               int64_t half_group, float *out) {
    __m256 totals[INT4_MAX_ROWS];
    float zero_terms[INT4_MAX_ROWS];
    for (int64_t m = 0; m < M; m++) {
        totals[m] = _mm256_setzero_ps();
        zero_terms[m] = 0.0f;
    }
    float low[512] __attribute__((aligned(32))), high[512] __attribute__((aligned(32)));
    for (int64_t g = 0; g < G; g++) {
        for (int64_t j = 0; j < half_group; j += 16) {
            __m256 lo0, lo1, hi0, hi1;
            int4_unpack16(row + g * half_group + j, &lo0, &lo1, &hi0, &hi1);
            _mm256_store_ps(low + j, lo0);
            _mm256_store_ps(low + j + 8, lo1);
            _mm256_store_ps(high + j, hi0);
            _mm256_store_ps(high + j + 8, hi1);
        }
        const __m256 scale = _mm256_set1_ps(scales[n * G + g]);
        const float zero = zero_scaled[n * G + g];
        for (int64_t m0 = 0; m0 < M; m0 += 4) { /* M is a multiple of 4 here */
            __m256 lo_acc[4], hi_acc[4];
            for (int i = 0; i < 4; i++) lo_acc[i] = hi_acc[i] = _mm256_setzero_ps();
            const float *xe = x_even + m0 * half + g * half_group;
            const float *xo = x_odd + m0 * half + g * half_group;
            for (int64_t j = 0; j < half_group; j += 8) {
                const __m256 wl = _mm256_load_ps(low + j), wh = _mm256_load_ps(high + j);
                for (int i = 0; i < 4; i++) { /* a constant count: the chains stay in registers */
                    lo_acc[i] = _mm256_fmadd_ps(wl, _mm256_loadu_ps(xe + i * half + j), lo_acc[i]);
                    hi_acc[i] = _mm256_fmadd_ps(wh, _mm256_loadu_ps(xo + i * half + j), hi_acc[i]);
                }
            }
            for (int i = 0; i < 4; i++) {
                const int64_t m = m0 + i;
                totals[m] = _mm256_fmadd_ps(_mm256_add_ps(lo_acc[i], hi_acc[i]), scale, totals[m]);
                zero_terms[m] += zero * x_group_sums[m * G + g];
            }
        }
    }
    for (int64_t m = 0; m < M; m++) out[m * N + n] = hsum256(totals[m]) - zero_terms[m];
}
#endif

/* The same in plain C: one row n of W for M rows of x. */
static void int4_row_c(const float *x_even, const float *x_odd, const float *x_group_sums,
                       const uint8_t *row, const float *scales, const float *zero_scaled,
                       int64_t n, int64_t M, int64_t N, int64_t G, int64_t half,
                       int64_t half_group, float *out) {
    float totals[INT4_MAX_ROWS] = {0};
    float low[512], high[512];
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *bytes = row + g * half_group;
        for (int64_t j = 0; j < half_group; j++) {
            low[j] = (float)(bytes[j] & 15);
            high[j] = (float)(bytes[j] >> 4);
        }
        const float scale = scales[n * G + g], zero = zero_scaled[n * G + g];
        for (int64_t m = 0; m < M; m++) {
            const float *xe = x_even + m * half + g * half_group;
            const float *xo = x_odd + m * half + g * half_group;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t j = 0; j < half_group; j++) dot += xe[j] * low[j] + xo[j] * high[j];
            totals[m] += dot * scale - zero * x_group_sums[m * G + g];
        }
    }
    for (int64_t m = 0; m < M; m++) out[m * N + n] = totals[m];
}

int int4_linear_f32(const float *x_even, const float *x_odd, const float *x_group_sums,
                    const uint8_t *packed, const float *scales, const float *zero_scaled,
                    int64_t M, int64_t N, int64_t K, int64_t group_size, float *out,
                    int nthreads) {
    if (M > INT4_MAX_ROWS || group_size % 2 || K % group_size || group_size > 1024) return -1;
    const int64_t half = K / 2, G = K / group_size, half_group = group_size / 2;
#if defined(__AVX2__) && defined(__FMA__)
    if (half_group % 16 == 0) {
        if (M == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
            for (int64_t pair = 0; pair < N / 2; pair++)
                int4_two_rows_avx2(x_even, x_odd, x_group_sums, packed, scales, zero_scaled,
                                   2 * pair, G, half, half_group, out);
            if (N % 2)
                int4_row_c(x_even, x_odd, x_group_sums, packed + (N - 1) * half, scales,
                           zero_scaled, N - 1, 1, N, G, half, half_group, out);
            return 0;
        }
        if (M % 4 == 0) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
            for (int64_t n = 0; n < N; n++)
                int4_row_many_avx2(x_even, x_odd, x_group_sums, packed + n * half, scales,
                                   zero_scaled, n, M, N, G, half, half_group, out);
            return 0;
        }
    }
#endif
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        int4_row_c(x_even, x_odd, x_group_sums, packed + n * half, scales, zero_scaled, n, M, N,
                   G, half, half_group, out);
    return 0;
}

/* Weight-int4 linear with int8 activations (decode): the same y = x @ W^T over the same packed
 * weights, but x is first quantized per row and block of 32 columns (scale = max|block| / 127,
 * x * (127 / max) rounded half to even, as w8a8.py's activations are) and the nibbles are
 * multiplied by those bytes in integer arithmetic: AVX2's maddubs takes 32 weight-activation
 * products a step where the float path converts and multiplies 8, which made it compute-bound.
 * Per block, sum(q * xq) is exact in int32 and scaled by the block's activation scale; per
 * group, that is scaled by the weight scale, minus zero_scaled times the group's sum of the
 * quantized x. So y is x-hat @ W^T with x-hat the dequantized activations, which is what
 * w4a16.reference_linear_q8 computes.
 * In a block the quantized x is stored even columns first, then odd ones: the order in which a
 * block's 16 packed bytes unpack (low nibbles, then high ones).
 *   x [M, K] float32; packed [N, K / 2]; scales, zero_scaled [N, G]; out [M, N]. */
#define Q8_BLOCK 32

static void q8_quantize_rows(const float *x, int64_t M, int64_t K, int64_t group_size,
                             int8_t *xq, float *x_scales, float *x_group_sums) {
    const int64_t blocks = K / Q8_BLOCK, G = K / group_size;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < G; g++) x_group_sums[m * G + g] = 0.0f;
        for (int64_t b = 0; b < blocks; b++) {
            const float *src = x + m * K + b * Q8_BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < Q8_BLOCK; i++) amax = fmaxf(amax, fabsf(src[i]));
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int8_t *dst = xq + m * K + b * Q8_BLOCK;
            int32_t sum = 0;
            for (int j = 0; j < Q8_BLOCK / 2; j++) {
                const int32_t even = (int32_t)nearbyintf(src[2 * j] * inv);
                const int32_t odd = (int32_t)nearbyintf(src[2 * j + 1] * inv);
                dst[j] = (int8_t)even;
                dst[Q8_BLOCK / 2 + j] = (int8_t)odd;
                sum += even + odd;
            }
            x_scales[m * blocks + b] = amax / 127.0f;
            x_group_sums[m * G + b * Q8_BLOCK / group_size] += amax / 127.0f * (float)sum;
        }
    }
}

/* sum(q * xq) over one block of row n for one row of x, in plain C. */
static inline int32_t q8_block_dot_c(const uint8_t *bytes, const int8_t *xq) {
    int32_t dot = 0;
    for (int j = 0; j < Q8_BLOCK / 2; j++)
        dot += (bytes[j] & 15) * xq[j] + (bytes[j] >> 4) * xq[Q8_BLOCK / 2 + j];
    return dot;
}

static void int4_q8_row_c(const int8_t *xq, const float *x_scales, const float *x_group_sums,
                          const uint8_t *row, const float *scales, const float *zero_scaled,
                          int64_t n, int64_t M, int64_t N, int64_t K, int64_t G, float *out) {
    const int64_t blocks = K / Q8_BLOCK, per_group = blocks / G;
    for (int64_t m = 0; m < M; m++) {
        float total = 0.0f;
        for (int64_t g = 0; g < G; g++) {
            float acc = 0.0f;
            for (int64_t b = g * per_group; b < (g + 1) * per_group; b++)
                acc += (float)q8_block_dot_c(row + b * Q8_BLOCK / 2, xq + m * K + b * Q8_BLOCK) *
                       x_scales[m * blocks + b];
            total += acc * scales[n * G + g] - zero_scaled[n * G + g] * x_group_sums[m * G + g];
        }
        out[m * N + n] = total;
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* One block's 16 packed bytes as 32 unsigned bytes: low nibbles, then high ones. */
static inline __m256i int4_unpack_block(const uint8_t *bytes) {
    const __m128i mask = _mm_set1_epi8(15);
    const __m128i b = _mm_loadu_si128((const __m128i *)bytes);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
}

/* sum(q * xq) of a block as 8 int32 lanes: maddubs makes 16-bit pair sums (at most
 * 2 * 15 * 127, no saturation), madd with ones widens them. */
static inline __m256i q8_block_dot(__m256i weights, __m256i xq) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(weights, xq), _mm256_set1_epi16(1));
}

/* Rows n0 .. n0 + 3 of W for one row of x: four independent chains of multiply-adds, and each
 * activation block loaded once for the four. */
static void int4_q8_four_rows_avx2(const int8_t *xq, const float *x_scales,
                                   const float *x_group_sums, const uint8_t *packed,
                                   const float *scales, const float *zero_scaled, int64_t n0,
                                   int64_t K, int64_t G, float *out) {
    const int64_t half = K / 2, per_group = K / Q8_BLOCK / G;
    __m256 totals[4];
    float zero_terms[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int r = 0; r < 4; r++) totals[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 acc[4];
        for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * Q8_BLOCK));
            const __m256 x_scale = _mm256_set1_ps(x_scales[b]);
            for (int r = 0; r < 4; r++) {
                const __m256i w = int4_unpack_block(packed + (n0 + r) * half + b * Q8_BLOCK / 2);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block_dot(w, x)), x_scale, acc[r]);
            }
        }
        for (int r = 0; r < 4; r++) {
            const int64_t at = (n0 + r) * G + g;
            totals[r] = _mm256_fmadd_ps(acc[r], _mm256_set1_ps(scales[at]), totals[r]);
            zero_terms[r] += zero_scaled[at] * x_group_sums[g];
        }
    }
    for (int r = 0; r < 4; r++) out[n0 + r] = hsum256(totals[r]) - zero_terms[r];
}

/* One row n of W for `rows` (1 to 4, a constant where it is inlined) rows of x from m0: each
 * block unpacked once for them, their sums kept in registers. */
static inline __attribute__((always_inline)) void int4_q8_row_tile_avx2(
    const int8_t *xq, const float *x_scales, const float *x_group_sums, const uint8_t *row,
    const float *scales, const float *zero_scaled, int64_t n, int64_t m0, const int rows,
    int64_t N, int64_t K, int64_t G, float *out) {
    const int64_t blocks = K / Q8_BLOCK, per_group = blocks / G;
    __m256 totals[4];
    float zero_terms[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int i = 0; i < rows; i++) totals[i] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 acc[4];
        for (int i = 0; i < rows; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t b = g * per_group; b < (g + 1) * per_group; b++) {
            const __m256i w = int4_unpack_block(row + b * Q8_BLOCK / 2);
            for (int i = 0; i < rows; i++) {
                const int64_t m = m0 + i;
                const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * Q8_BLOCK));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q8_block_dot(w, x)),
                                         _mm256_set1_ps(x_scales[m * blocks + b]), acc[i]);
            }
        }
        const __m256 scale = _mm256_set1_ps(scales[n * G + g]);
        for (int i = 0; i < rows; i++) {
            totals[i] = _mm256_fmadd_ps(acc[i], scale, totals[i]);
            zero_terms[i] += zero_scaled[n * G + g] * x_group_sums[(m0 + i) * G + g];
        }
    }
    for (int i = 0; i < rows; i++) out[(m0 + i) * N + n] = hsum256(totals[i]) - zero_terms[i];
}

/* One row n of W for M rows of x: tiles of four rows, then single ones. */
static void int4_q8_row_many_avx2(const int8_t *xq, const float *x_scales,
                                  const float *x_group_sums, const uint8_t *row,
                                  const float *scales, const float *zero_scaled, int64_t n,
                                  int64_t M, int64_t N, int64_t K, int64_t G, float *out) {
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4)
        int4_q8_row_tile_avx2(xq, x_scales, x_group_sums, row, scales, zero_scaled, n, m0, 4, N,
                              K, G, out);
    for (; m0 < M; m0++)
        int4_q8_row_tile_avx2(xq, x_scales, x_group_sums, row, scales, zero_scaled, n, m0, 1, N,
                              K, G, out);
}
#endif

int int4_linear_q8(const float *x, const uint8_t *packed, const float *scales,
                   const float *zero_scaled, int64_t M, int64_t N, int64_t K,
                   int64_t group_size, float *out, int nthreads) {
    if (M < 1 || M > INT4_MAX_ROWS || group_size % Q8_BLOCK || K % group_size ||
        group_size > 1024)
        return -1;
    const int64_t G = K / group_size, half = K / 2;
    int8_t *xq = malloc((size_t)(M * K));
    float *x_scales = malloc(sizeof(float) * (size_t)(M * (K / Q8_BLOCK)));
    float *x_group_sums = malloc(sizeof(float) * (size_t)(M * G));
    if (!xq || !x_scales || !x_group_sums) {
        free(xq);
        free(x_scales);
        free(x_group_sums);
        return -2;
    }
    q8_quantize_rows(x, M, K, group_size, xq, x_scales, x_group_sums);
#if defined(__AVX2__) && defined(__FMA__)
    if (M == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t quad = 0; quad < N / 4; quad++)
            int4_q8_four_rows_avx2(xq, x_scales, x_group_sums, packed, scales, zero_scaled,
                                   4 * quad, K, G, out);
        for (int64_t n = N - N % 4; n < N; n++)
            int4_q8_row_c(xq, x_scales, x_group_sums, packed + n * half, scales, zero_scaled, n,
                          1, N, K, G, out);
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = 0; n < N; n++)
            int4_q8_row_many_avx2(xq, x_scales, x_group_sums, packed + n * half, scales,
                                  zero_scaled, n, M, N, K, G, out);
    }
#else
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        int4_q8_row_c(xq, x_scales, x_group_sums, packed + n * half, scales, zero_scaled, n, M,
                      N, K, G, out);
#endif
    free(xq);
    free(x_scales);
    free(x_group_sums);
    return 0;
}

/* An int4 weight dequantized to float32 for the prefill's float matmul: out[n, k] = q * scale -
 * zero_scaled, which is (q - zero) * scale exactly (both products are exact in float32, a small
 * integer times a float16 scale, and so is their difference), so the result is bitwise that of
 * w4a16's torch dequantize, written once instead of through torch's temporaries.
 *   packed [N, K / 2]; scales, zero_scaled [N, G]; out [N, K]. */
int int4_dequantize_f32(const uint8_t *packed, const float *scales, const float *zero_scaled,
                        int64_t N, int64_t K, int64_t group_size, float *out, int nthreads) {
    if (group_size % 2 || K % group_size) return -1;
    const int64_t half = K / 2, G = K / group_size, half_group = group_size / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const uint8_t *bytes = packed + n * half + g * half_group;
            float *dst = out + n * K + g * group_size;
            const float scale = scales[n * G + g], zero = zero_scaled[n * G + g];
            int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
            const __m128i mask = _mm_set1_epi8(15);
            const __m256 vscale = _mm256_set1_ps(scale), vzero = _mm256_set1_ps(zero);
            for (; j + 16 <= half_group; j += 16) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(bytes + j));
                const __m128i lo = _mm_and_si128(b, mask);
                const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
                const __m128i parts[2] = {_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi)};
                for (int p = 0; p < 2; p++)
                    for (int h = 0; h < 2; h++) {
                        const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(
                            h ? _mm_srli_si128(parts[p], 8) : parts[p]));
                        _mm256_storeu_ps(dst + 2 * j + p * 16 + h * 8,
                                         _mm256_fmsub_ps(q, vscale, vzero));
                    }
            }
#endif
            for (; j < half_group; j++) {
                dst[2 * j] = (float)(bytes[j] & 15) * scale - zero;
                dst[2 * j + 1] = (float)(bytes[j] >> 4) * scale - zero;
            }
        }
    }
    return 0;
}

/* Weight-int8 linear with int8 activations for decode-sized batches, y = x @ W^T * w_scale +
 * bias: w8a8.py's arithmetic (the AVX-512 VNNI kernel's, in cpu_kernels.c) for CPUs without
 * AVX-512. x is quantized per row and block of 64 columns (scale = max|block| / 127, values
 * x * (1 / scale) rounded half to even and clamped to +-127, as w8a8.quantize_activations);
 * weights are bytes q + 128. A block's products are summed exactly in int32 (AVX2: maddubs
 * of |q| with x carrying q's sign, so both factors fit its unsigned x signed form without
 * saturating: 2 * 127 * 127 < 2^15), scaled by the block's activation scale, and the row's sum
 * by the weight row's scale.
 *   x [M, K] float32; weights [N, K] uint8; w_scales [N]; bias [N] or NULL; out [M, N]. */
#define W8_BLOCK 64

static void w8_quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq,
                             float *x_scales) {
    const int64_t blocks = K / W8_BLOCK;
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < blocks; b++) {
            const float *src = x + m * K + b * W8_BLOCK;
            float amax = 0.0f;
            for (int i = 0; i < W8_BLOCK; i++) amax = fmaxf(amax, fabsf(src[i]));
            const float scale = amax / 127.0f;
            const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
            for (int i = 0; i < W8_BLOCK; i++) {
                float v = nearbyintf(src[i] * inv);
                v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
                xq[m * K + b * W8_BLOCK + i] = (int8_t)v;
            }
            x_scales[m * blocks + b] = scale;
        }
}

static float w8_row_dot_c(const uint8_t *row, const int8_t *xq, const float *x_scales,
                          int64_t K) {
    float total = 0.0f;
    for (int64_t b = 0; b < K / W8_BLOCK; b++) {
        int32_t dot = 0;
        for (int i = 0; i < W8_BLOCK; i++)
            dot += ((int32_t)row[b * W8_BLOCK + i] - 128) * xq[b * W8_BLOCK + i];
        total += (float)dot * x_scales[b];
    }
    return total;
}

#if defined(__AVX2__) && defined(__FMA__)
/* sum(q * x) of 32 bytes of weights (stored q + 128) and 32 int8 activations, as 8 int32
 * lanes. */
static inline __m256i w8_dot32(__m256i stored, __m256i x) {
    const __m256i q = _mm256_xor_si256(stored, _mm256_set1_epi8((char)0x80)); /* q, signed */
    const __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
    return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
}

/* Rows n0 .. n0 + 3 of W for one row of x. */
static void w8_four_rows_avx2(const int8_t *xq, const float *x_scales, const uint8_t *weights,
                              int64_t n0, int64_t K, float totals_out[4]) {
    __m256 acc[4];
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / W8_BLOCK; b++) {
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xq + b * W8_BLOCK));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xq + b * W8_BLOCK + 32));
        const __m256 scale = _mm256_set1_ps(x_scales[b]);
        for (int r = 0; r < 4; r++) {
            const uint8_t *w = weights + (n0 + r) * K + b * W8_BLOCK;
            const __m256i dot = _mm256_add_epi32(
                w8_dot32(_mm256_loadu_si256((const __m256i *)w), x0),
                w8_dot32(_mm256_loadu_si256((const __m256i *)(w + 32)), x1));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r]);
        }
    }
    for (int r = 0; r < 4; r++) totals_out[r] = hsum256(acc[r]);
}

/* One row of W for one row of x. */
static float w8_row_avx2(const int8_t *xq, const float *x_scales, const uint8_t *row,
                         int64_t K) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / W8_BLOCK; b++) {
        const uint8_t *w = row + b * W8_BLOCK;
        const __m256i dot = _mm256_add_epi32(
            w8_dot32(_mm256_loadu_si256((const __m256i *)w),
                     _mm256_loadu_si256((const __m256i *)(xq + b * W8_BLOCK))),
            w8_dot32(_mm256_loadu_si256((const __m256i *)(w + 32)),
                     _mm256_loadu_si256((const __m256i *)(xq + b * W8_BLOCK + 32))));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(x_scales[b]), acc);
    }
    return hsum256(acc);
}
#endif

int w8a8_linear_f32(const float *x, int64_t M, int64_t K, const uint8_t *weights,
                    const float *w_scales, const float *bias, int64_t N, float *out,
                    int nthreads) {
    if (M < 1 || K % W8_BLOCK) return -1;
    const int64_t blocks = K / W8_BLOCK;
    int8_t *xq = malloc((size_t)(M * K));
    float *x_scales = malloc(sizeof(float) * (size_t)(M * blocks));
    if (!xq || !x_scales) {
        free(xq);
        free(x_scales);
        return -2;
    }
    w8_quantize_rows(x, M, K, xq, x_scales);
#if defined(__AVX2__) && defined(__FMA__)
    if (M == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t quad = 0; quad < N / 4; quad++) {
            float totals[4];
            w8_four_rows_avx2(xq, x_scales, weights, 4 * quad, K, totals);
            for (int r = 0; r < 4; r++) {
                const int64_t n = 4 * quad + r;
                out[n] = totals[r] * w_scales[n] + (bias ? bias[n] : 0.0f);
            }
        }
        for (int64_t n = N - N % 4; n < N; n++)
            out[n] = w8_row_dot_c(weights + n * K, xq, x_scales, K) * w_scales[n] +
                     (bias ? bias[n] : 0.0f);
    } else {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t n = 0; n < N; n++)
            for (int64_t m = 0; m < M; m++)
                out[m * N + n] =
                    w8_row_avx2(xq + m * K, x_scales + m * blocks, weights + n * K, K) *
                        w_scales[n] + (bias ? bias[n] : 0.0f);
    }
#else
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            out[m * N + n] = w8_row_dot_c(weights + n * K, xq + m * K, x_scales + m * blocks, K) *
                                 w_scales[n] + (bias ? bias[n] : 0.0f);
#endif
    free(xq);
    free(x_scales);
    return 0;
}
