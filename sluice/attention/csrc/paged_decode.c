/* Paged decode attention on the CPU: one query token per request, K/V read in place from the paged cache.
 *
 * kv_cache [2, num_blocks, block_size, Hkv, D] (K then V), query/out [num_tokens, H, D] (each with its token stride),
 * block_table [num_table_rows, table_stride] int32. Request i reads block_table row rows[i], sees positions
 * [max(0, seq_lens[i] - window), seq_lens[i]) and writes out[tokens[i]].
 *
 * Work item = (request, kv head, split): the G = H / Hkv query heads that share a KV head are done together,
 * so each K/V row is converted to float32 once and used G times. Within an item, blocks are visited in order
 * with an online softmax (running max and sum per head, accumulator rescaled when the max grows). When there
 * are few (request, kv head) pairs for the threads, each request's blocks are cut into splits whose partial
 * (max, sum, acc) are merged at the end (split-K / flash decoding).
 *
 * Element types: 0 float32, 1 bfloat16, 2 float16, 3 float8_e4m3fn (cache only). All math is float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

enum { F32 = 0, BF16 = 1, F16 = 2, FP8_E4M3 = 3 };

static float fp8_table[256];
static int fp8_ready = 0;

static void init_fp8_table(void) {
    for (int b = 0; b < 256; b++) {
        int sign = b >> 7, exp = (b >> 3) & 15, man = b & 7;
        float v;
        if (exp == 15 && man == 7) v = NAN;
        else if (exp == 0) v = ldexpf((float)man, -9);  /* subnormal: man/8 * 2^-6 */
        else v = ldexpf(1.0f + man / 8.0f, exp - 7);
        fp8_table[b] = sign ? -v : v;
    }
    fp8_ready = 1;
}

static inline size_t elem_size(int dtype) {
    return dtype == F32 ? 4 : dtype == FP8_E4M3 ? 1 : 2;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define SIMD512 1
static inline __mmask16 tail_mask(int n, int i) {
    int left = n - i;
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}
#endif

/* n elements of type dtype at src as float32: src itself for float32, else converted into dst */
static inline const float *to_float(const void *src, float *restrict dst, int n, int dtype) {
    switch (dtype) {
    case F32:
        return (const float *)src;
    case BF16: {
        const uint16_t *s = (const uint16_t *)src;
#ifdef SIMD512
        for (int i = 0; i < n; i += 16) {
            __mmask16 m = tail_mask(n, i);
            __m512i w = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, s + i));
            _mm512_mask_storeu_ps(dst + i, m, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
        }
#else
        for (int i = 0; i < n; i++) {
            uint32_t bits = (uint32_t)s[i] << 16;
            memcpy(dst + i, &bits, 4);
        }
#endif
        return dst;
    }
    case F16: {
        const _Float16 *s = (const _Float16 *)src;
#ifdef SIMD512
        for (int i = 0; i < n; i += 16) {
            __mmask16 m = tail_mask(n, i);
            _mm512_mask_storeu_ps(dst + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, s + i)));
        }
#else
        for (int i = 0; i < n; i++) dst[i] = (float)s[i];
#endif
        return dst;
    }
    default: {
        const uint8_t *s = (const uint8_t *)src;
        for (int i = 0; i < n; i++) dst[i] = fp8_table[s[i]];
        return dst;
    }
    }
}

/* dst[i] += a * x[i] */
static inline void axpy(float *restrict dst, float a, const float *restrict x, int n) {
#ifdef SIMD512
    __m512 va = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n, i);
        __m512 d = _mm512_maskz_loadu_ps(m, dst + i);
        _mm512_mask_storeu_ps(dst + i, m, _mm512_fmadd_ps(va, _mm512_maskz_loadu_ps(m, x + i), d));
    }
#else
    for (int i = 0; i < n; i++) dst[i] += a * x[i];
#endif
}

static inline void from_float(const float *src, void *dst, int n, int dtype) {
    switch (dtype) {
    case F32:
        memcpy(dst, src, (size_t)n * 4);
        break;
    case BF16: {
        uint16_t *d = (uint16_t *)dst;
        for (int i = 0; i < n; i++) {  /* round to nearest even, as torch's .to(bfloat16) */
            uint32_t bits;
            memcpy(&bits, src + i, 4);
            if ((bits & 0x7fffffffu) > 0x7f800000u) d[i] = (uint16_t)((bits >> 16) | 0x40);  /* NaN stays NaN */
            else d[i] = (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
        }
        break;
    }
    default: {
        _Float16 *d = (_Float16 *)dst;
        for (int i = 0; i < n; i++) d[i] = (_Float16)src[i];
    }
    }
}

/* exp(x) for x <= 0 (scores minus their max), relative error ~2e-7: 2^(x log2 e) as 2^n * 2^f, f in [-0.5, 0.5],
 * with a degree-6 polynomial for 2^f. Plain arithmetic, so loops over it vectorize (libm's expf does not). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;  /* also maps -inf to a value whose exp is ~0 */
    float t = x * 1.44269504088896341f;
    float n = __builtin_rintf(t);
    float f = t - n;
    float p = 1.5353362e-4f;
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6181291e-3f;
    p = p * f + 5.5504109e-2f;
    p = p * f + 2.4022651e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits;
    memcpy(&bits, &p, 4);
    bits += (int32_t)n << 23;
    memcpy(&p, &bits, 4);
    return x <= -87.0f ? 0.0f : p;
}

static inline float dot(const float *restrict a, const float *restrict b, int n) {
#ifdef SIMD512
    __m512 acc = _mm512_setzero_ps();
    for (int i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n, i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
#else
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
#endif
}

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define MAX_BLOCK 256

static inline void prefetch_block(const char *k_base, const char *v_base, int32_t block, int block_size,
                                  size_t row_stride, size_t head_off, size_t row_bytes) {
    size_t off = (size_t)block * block_size * row_stride + head_off;
    for (int t = 0; t < block_size; t++, off += row_stride)
        for (size_t c = 0; c < row_bytes; c += 64) {
            __builtin_prefetch(k_base + off + c, 0, 3);
            __builtin_prefetch(v_base + off + c, 0, 3);
        }
}

/* One item: G heads of kv head `kvh` of one request over blocks [b0, b1) of its visible range [first, last).
 * Leaves per head the running max m[g], sum l[g] and unnormalized accumulator acc[g * D]. */
static inline __attribute__((always_inline)) void attend_range(const float *q, const char *k_base, const char *v_base, const int32_t *table_row,
                         int b0, int b1, int first, int last, int block_size, int num_kv_heads, int kvh, int D,
                         int G, int kv_dtype, float scale, float soft_cap, float *m, float *l, float *acc) {
    float krow[MAX_HEAD_DIM], vrow[MAX_HEAD_DIM];
    float scores[MAX_GROUP * MAX_BLOCK];
    const size_t esz = elem_size(kv_dtype);
    const size_t row_stride = (size_t)num_kv_heads * D * esz;
    for (int g = 0; g < G; g++) { m[g] = -INFINITY; l[g] = 0.0f; }
    memset(acc, 0, sizeof(float) * G * D);
    const size_t head_off = (size_t)kvh * D * esz, row_bytes = (size_t)D * esz;
    if (b0 < b1) prefetch_block(k_base, v_base, table_row[b0], block_size, row_stride, head_off, row_bytes);
    for (int b = b0; b < b1; b++) {
        if (b + 1 < b1)  /* the next block's rows are scattered elsewhere in the cache: ask for them early */
            prefetch_block(k_base, v_base, table_row[b + 1], block_size, row_stride, head_off, row_bytes);
        int p0 = b * block_size, p1 = p0 + block_size;
        if (p0 < first) p0 = first;
        if (p1 > last) p1 = last;
        if (p0 >= p1) continue;
        int cnt = p1 - p0;
        size_t block_off = ((size_t)table_row[b] * block_size) * row_stride + (size_t)kvh * D * esz;
        const char *kb = k_base + block_off, *vb = v_base + block_off;
        int t0 = p0 - b * block_size;
        for (int t = 0; t < cnt; t++) {
            const float *k = to_float(kb + (size_t)(t0 + t) * row_stride, krow, D, kv_dtype);
            for (int g = 0; g < G; g++) {
                float s = dot(q + (size_t)g * D, k, D) * scale;
                if (soft_cap > 0.0f) s = soft_cap * tanhf(s / soft_cap);
                scores[g * MAX_BLOCK + t] = s;
            }
        }
        for (int g = 0; g < G; g++) {  /* online softmax: rescale what came before to the new max */
            float *sg = scores + g * MAX_BLOCK;
            float bm = sg[0];
            for (int t = 1; t < cnt; t++) bm = sg[t] > bm ? sg[t] : bm;
            float new_m = bm > m[g] ? bm : m[g];
            float corr = m[g] == -INFINITY ? 0.0f : expf(m[g] - new_m);
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int t = 0; t < cnt; t++) { sg[t] = exp_nonpositive(sg[t] - new_m); sum += sg[t]; }
            l[g] = l[g] * corr + sum;
            m[g] = new_m;
            if (corr != 1.0f) {
                float *ag = acc + (size_t)g * D;
#pragma omp simd
                for (int d = 0; d < D; d++) ag[d] *= corr;
            }
        }
        for (int t = 0; t < cnt; t++) {
            const float *v = to_float(vb + (size_t)(t0 + t) * row_stride, vrow, D, kv_dtype);
            for (int g = 0; g < G; g++) axpy(acc + (size_t)g * D, scores[g * MAX_BLOCK + t], v, D);
        }
    }
}

/* Returns 0, or a negative code when the shapes are outside what this kernel handles. */
int sluice_paged_decode(void *out, const void *query, const void *kv_cache, const int32_t *block_table,
                        const int32_t *rows, const int32_t *seq_lens, const int32_t *tokens, int num_reqs,
                        int num_heads, int num_kv_heads, int head_dim, int block_size, int64_t num_blocks,
                        int64_t table_stride, int64_t token_stride, int64_t out_stride, int q_dtype, int kv_dtype, float scale,
                        float v_scale, int window, float soft_cap, int num_threads) {
    const int D = head_dim, G = num_heads / num_kv_heads;
    if (D > MAX_HEAD_DIM || G > MAX_GROUP || block_size > MAX_BLOCK || num_heads % num_kv_heads) return -1;
    if (kv_dtype == FP8_E4M3 && !fp8_ready) init_fp8_table();
    const size_t kv_esz = elem_size(kv_dtype), q_esz = elem_size(q_dtype);
    const char *k_base = (const char *)kv_cache;
    const char *v_base = k_base + (size_t)num_blocks * block_size * num_kv_heads * D * kv_esz;

    int max_len = 0;
    for (int i = 0; i < num_reqs; i++) {
        int len = seq_lens[i] < window || window <= 0 ? seq_lens[i] : window;
        max_len = len > max_len ? len : max_len;
    }
    /* splits: enough items for every thread to get a few, each split at least 4 blocks long */
    const int pairs = num_reqs * num_kv_heads;
    int splits = 1;
    if (pairs < 4 * num_threads) {
        int want = (4 * num_threads + pairs - 1) / pairs;
        int most = (max_len / block_size + 1) / 4;
        splits = want < most ? want : most;
        if (splits < 1) splits = 1;
    }
    const int items = pairs * splits;
    float *partial = NULL;  /* per item: m[G], l[G], acc[G * D] */
    const size_t part_len = (size_t)G * (D + 2);
    if (splits > 1) {
        partial = (float *)malloc(sizeof(float) * part_len * items);
        if (!partial) return -2;
    }

#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int item = 0; item < items; item++) {
        int split = item % splits, pair = item / splits;
        int i = pair / num_kv_heads, kvh = pair % num_kv_heads;
        int last = seq_lens[i];
        int first = window > 0 && last > window ? last - window : 0;
        int fb = first / block_size, lb = (last + block_size - 1) / block_size;
        int per = (lb - fb + splits - 1) / splits;
        int b0 = fb + split * per, b1 = b0 + per < lb ? b0 + per : lb;
        const int64_t tok = tokens ? tokens[i] : i;
        const char *qp = (const char *)query + ((size_t)tok * token_stride + (size_t)kvh * G * D) * q_esz;
        float qbuf[MAX_GROUP * MAX_HEAD_DIM];
        const float *qf = to_float(qp, qbuf, G * D, q_dtype);
        float local[MAX_GROUP * (MAX_HEAD_DIM + 2)];
        float *m = partial ? partial + part_len * item : local;
        float *l = m + G, *acc = l + G;
        const int32_t *table_row = block_table + (size_t)rows[i] * table_stride;
        if (b1 < b0) b1 = b0;
        switch (D) {  /* constant head dims (the common ones) let the compiler unroll the row loops */
#define ATTEND(DIM) attend_range(qf, k_base, v_base, table_row, b0, b1, first, last, block_size, num_kv_heads, \
                                 kvh, DIM, G, kv_dtype, scale, soft_cap, m, l, acc)
        case 64: ATTEND(64); break;
        case 128: ATTEND(128); break;
        default: ATTEND(D);
#undef ATTEND
        }
        if (splits == 1) {
            char *op = (char *)out + ((size_t)tok * out_stride + (size_t)kvh * G * D) * q_esz;
            for (int g = 0; g < G; g++) {
                float inv = l[g] > 0.0f ? v_scale / l[g] : 0.0f;
                float *ag = acc + (size_t)g * D;
                for (int d = 0; d < D; d++) ag[d] *= inv;
                from_float(ag, op + (size_t)g * D * q_esz, D, q_dtype);
            }
        }
    }

    if (splits > 1) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int pair = 0; pair < pairs; pair++) {
            int i = pair / num_kv_heads, kvh = pair % num_kv_heads;
            const int64_t tok = tokens ? tokens[i] : i;
            char *op = (char *)out + ((size_t)tok * out_stride + (size_t)kvh * G * D) * q_esz;
            float res[MAX_HEAD_DIM];
            for (int g = 0; g < G; g++) {
                float gm = -INFINITY;
                for (int s = 0; s < splits; s++) {
                    float ms = partial[part_len * (pair * splits + s) + g];
                    gm = ms > gm ? ms : gm;
                }
                float total = 0.0f;
                for (int d = 0; d < D; d++) res[d] = 0.0f;
                for (int s = 0; s < splits; s++) {
                    const float *p = partial + part_len * (pair * splits + s);
                    if (p[g] == -INFINITY) continue;  /* an empty split */
                    float w = expf(p[g] - gm);
                    total += p[G + g] * w;
                    const float *ag = p + 2 * G + (size_t)g * D;
                    for (int d = 0; d < D; d++) res[d] += w * ag[d];
                }
                float inv = total > 0.0f ? v_scale / total : 0.0f;
                for (int d = 0; d < D; d++) res[d] *= inv;
                from_float(res, op + (size_t)g * D * q_esz, D, q_dtype);
            }
        }
        free(partial);
    }
    return 0;
}
