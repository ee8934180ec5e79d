/* Fused elementwise kernels of a decoder layer on the CPU, bfloat16 only (layers/cpu_fused.py).
 *
 * Each follows its torch reference (norm.py, activation.py, rotary.py) rounding for rounding: every value torch
 * rounds to bfloat16 between two ops is rounded here too (round to nearest even), and the math between roundings
 * is float32. What can differ: the order of the RMS sum of squares (vector partial sums), and cos/sin/exp within
 * an ulp of float32 before their bfloat16 rounding. One call replaces the 5-12 torch ops of each reference, which at
 * a decode step's few rows cost more in dispatch than in arithmetic.
 *
 * Rows are spread over ``num_threads`` OpenMP threads (torch's count, passed by the caller) only when there are
 * enough of them to pay for waking the team.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PARALLEL_MIN_ROWS 16
#define MAX_STACK_WIDTH 16384

typedef union { float f; uint32_t u; int32_t i; } bits32; /* type punning the vectorizer follows */

static inline float bf2f(uint16_t h) {
    bits32 b = {.u = (uint32_t)h << 16};
    return b.f;
}

static inline uint16_t f2bf(float f) {
    bits32 b = {.f = f};
    uint32_t u = b.u;
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN (quiet) */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

/* e^x within about an ulp of float32, in a form the compiler vectorizes (libm's expf is a scalar call here):
 * x = n ln2 + r with |r| <= ln2 / 2 (two-part ln2), e^r by its Taylor polynomial to r^7, 2^n built in the
 * exponent bits. Overflow gives inf and x < -103 gives 0, as expf; between -103 and -86 it returns e^-86 (the
 * SiLU adds it to 1, where both vanish). */
static inline float exp_vec(float x) {
    float xc = x < -86.0f ? -86.0f : (x > 88.7f ? 88.7f : x); /* NaN passes through */
    float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
    float r = xc - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    bits32 scale = {.i = ((int32_t)n + 126) << 23}; /* 2^(n - 1): n reaches 128 near the top of the range */
    float e = p * scale.f * 2.0f;
    return x > 88.7f ? INFINITY : (x < -103.0f ? 0.0f : e);
}

/* out = norm(x) or, with a residual, new_residual = x + residual and out = norm(new_residual):
 *   plain (gemma 0):  out = weight * bf16(v * rsqrt(mean(v^2) + eps))      (RMSNorm: the product rounds again)
 *   gemma (gemma 1):  out = bf16(v * rsqrt(mean(v^2) + eps) * (1 + weight)) (GemmaRMSNorm: float32 throughout)
 * Strides are in elements, per row. */
int sluice_rms_norm(const uint16_t *x, const uint16_t *residual, const uint16_t *weight, uint16_t *out,
                    uint16_t *new_residual, int rows, int width, int64_t stride_x, int64_t stride_r,
                    int64_t stride_o, int64_t stride_nr, float eps, int gemma, int num_threads) {
    if (width > MAX_STACK_WIDTH) return -1;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows >= PARALLEL_MIN_ROWS)
    for (int r = 0; r < rows; r++) {
        float v[MAX_STACK_WIDTH];
        const uint16_t *xr = x + r * stride_x;
        float partial[16] = {0};
        if (residual) {
            const uint16_t *rr = residual + r * stride_r;
            uint16_t *nr = new_residual + r * stride_nr;
            for (int c = 0; c < width; c++) {
                uint16_t b = f2bf(bf2f(xr[c]) + bf2f(rr[c]));
                nr[c] = b;
                v[c] = bf2f(b);
            }
        } else {
            for (int c = 0; c < width; c++) v[c] = bf2f(xr[c]);
        }
        int c = 0;
        for (; c + 16 <= width; c += 16)
            for (int j = 0; j < 16; j++) partial[j] += v[c + j] * v[c + j];
        float sum = 0.0f;
        for (int j = 0; j < 16; j++) sum += partial[j];
        for (; c < width; c++) sum += v[c] * v[c];
        float inv = 1.0f / sqrtf(sum / (float)width + eps);
        uint16_t *orow = out + r * stride_o;
        if (gemma) {
            for (int k = 0; k < width; k++) orow[k] = f2bf(v[k] * inv * (1.0f + bf2f(weight[k])));
        } else {
            for (int k = 0; k < width; k++) orow[k] = f2bf(bf2f(weight[k]) * round_bf(v[k] * inv));
        }
    }
    return 0;
}

static void silu_and_mul_row(const uint16_t *restrict gate, const uint16_t *restrict up, uint16_t *restrict out,
                             int d) {
    for (int c = 0; c < d; c++) {
        float g = bf2f(gate[c]);
        float s = round_bf(g / (1.0f + exp_vec(-g)));
        out[c] = f2bf(s * bf2f(up[c]));
    }
}

/* x [rows, 2 * d] as [gate | up] -> out [rows, d] = bf16(bf16(silu(gate)) * up) */
int sluice_silu_and_mul(const uint16_t *x, uint16_t *out, int rows, int d, int64_t stride_x, int64_t stride_o,
                        int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (rows >= PARALLEL_MIN_ROWS)
    for (int r = 0; r < rows; r++) silu_and_mul_row(x + r * stride_x, x + r * stride_x + d, out + r * stride_o, d);
    return 0;
}

/* Neox rope in place on q [tokens, hq, head_dim] and k [tokens, hk, head_dim] (token strides given): the first
 * rot_dim dims of each head rotate as two halves; cos/sin = bf16(cos/sin(position * inv_freq)). */
int sluice_rope_neox(uint16_t *q, uint16_t *k, const int64_t *positions, const float *inv_freq, int tokens,
                     int hq, int hk, int head_dim, int rot_dim, int64_t stride_q, int64_t stride_k,
                     int num_threads) {
    int half = rot_dim / 2;
    if (half > 512) return -1;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (tokens >= PARALLEL_MIN_ROWS)
    for (int t = 0; t < tokens; t++) {
        float cs[512], sn[512];
        float pos = (float)positions[t];
        for (int i = 0; i < half; i++) {
            float f = pos * inv_freq[i];
            cs[i] = round_bf(cosf(f));
            sn[i] = round_bf(sinf(f));
        }
        for (int h = 0; h < hq + hk; h++) {
            uint16_t *base = h < hq ? q + t * stride_q + (int64_t)h * head_dim
                                    : k + t * stride_k + (int64_t)(h - hq) * head_dim;
            for (int i = 0; i < half; i++) {
                float x1 = bf2f(base[i]), x2 = bf2f(base[i + half]);
                base[i] = f2bf(round_bf(x1 * cs[i]) - round_bf(x2 * sn[i]));
                base[i + half] = f2bf(round_bf(x2 * cs[i]) + round_bf(x1 * sn[i]));
            }
        }
    }
    return 0;
}

/* Structured outputs' token bitmask on CPU logits (structured_output/apply.py): on each listed row, every id below
 * vocab whose bit is 0 becomes -inf, and so does every id from vocab to width (an LM head padded past the
 * grammar's ids); bit j of word w is id 32w + j (xgrammar's layout), and bitmask row r belongs to logits row r.
 * The logits are moved as raw bits: elem_size 4 (float32) or 2 (bfloat16, float16), neg_inf the dtype's -inf.
 * Exact: every value is kept or replaced. Words with every bit set are skipped. */
int sluice_apply_bitmask(void *logits, int elem_size, uint32_t neg_inf, int64_t row_stride, const int32_t *bitmask,
                         int64_t bitmask_stride, const int64_t *rows, int num_rows, int64_t vocab, int64_t width,
                         int num_threads) {
    if (elem_size != 4 && elem_size != 2) return 1;
    int64_t num_words = (vocab + 31) / 32;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_rows >= PARALLEL_MIN_ROWS)
    for (int i = 0; i < num_rows; i++) {
        const uint32_t *mask = (const uint32_t *)(bitmask + rows[i] * bitmask_stride);
        uint32_t *out32 = (uint32_t *)logits + rows[i] * row_stride;
        uint16_t *out16 = (uint16_t *)logits + rows[i] * row_stride;
        for (int64_t w = 0; w < num_words; w++) {
            uint32_t word = mask[w];
            if (word == 0xFFFFFFFFu) continue;
            int64_t base = w * 32;
            int n = vocab - base < 32 ? (int)(vocab - base) : 32;
            if (elem_size == 4) {
                for (int j = 0; j < n; j++) out32[base + j] = (word >> j) & 1u ? out32[base + j] : neg_inf;
            } else {
                for (int j = 0; j < n; j++) out16[base + j] = (word >> j) & 1u ? out16[base + j] : (uint16_t)neg_inf;
            }
        }
        if (elem_size == 4) {
            for (int64_t t = vocab; t < width; t++) out32[t] = neg_inf;
        } else {
            for (int64_t t = vocab; t < width; t++) out16[t] = (uint16_t)neg_inf;
        }
    }
    return 0;
}
