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
