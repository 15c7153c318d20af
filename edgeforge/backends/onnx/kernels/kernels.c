/* edgeforge's block-quantized matmul kernels for x86 (Y = X W^T, W 4- or 8-bit in blocks of 32),
 * compiled once per instruction set: -DEF_VNNI with AVX-512 VNNI + VL (vpdpbusd on 256-bit
 * registers), else AVX2 (maddubs + madd). op.c picks one at load time and runs it inside ONNX
 * Runtime (the custom op edgeforge.MatMulQ).
 *
 * Weights (kernels/__init__.py pack_blocks writes them at compile time; the bundle stores them as
 * they are read): rows in groups of 8 (the last group padded with zero rows), each group one stream
 * of its blocks (32 weights along K) in order, 16 + 32 x bits bytes a block:
 *   16 B: the 8 rows' fp16 scales
 *   4-bit: 4 x 32 B, chunk j (K = 8j .. 8j + 7 of the block), byte 4r + t: row r's code of
 *   K = 8j + t in the low nibble, of K = 8j + 4 + t in the high nibble; zero point 8.
 *   8-bit: 8 x 32 B, chunk j (K = 4j .. 4j + 3), byte 4r + t: row r's code of K = 4j + t; zero point 128.
 * 18 (34) bytes a block and row: the bundle's 4.5 (8.5) bits a weight, read front to back, nothing
 * repacked. A chunk is 8 rows x 4 consecutive K, the lanes of one 32-bit dot product instruction,
 * so a block needs one int32 -> float conversion and one FMA per 8 rows, whatever K.
 *
 * Activations: int8 per block of 32 (scale = max|x| / 127, x / scale rounded half to even: ONNX
 * Runtime's MatMulNBits accuracy_level 4, emulated by model/reference.py int8_blocks), in their own
 * order; per block its scale d and its code sum s: -zero point x s seeds the block's int32 dot
 * product and so subtracts the zero point for free.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifdef EF_VNNI
#define EF(name) name##_vnni
#define RN 8 /* activation rows per inner step: 8 accumulators + 8 weight registers of 32 */
#else
#define EF(name) name##_avx2
#define RN 4 /* of 16 registers */
#endif

#define BLOCK_BYTES_4 144
#define BLOCK_BYTES_8 272
#define PANEL_BYTES 262144  /* int8 activation rows kept in L2 while the weight groups pass */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4608 /* bytes: 32 blocks ahead (decode streams the weights) */
#endif

static inline __m256i dot4(__m256i acc, __m256i w, const int8_t *a) {
    const __m256i x = _mm256_set1_epi32(*(const int32_t *)a);
#ifdef EF_VNNI
    return _mm256_dpbusd_epi32(acc, w, x);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
#endif
}

/* One row of x (k values, k % 32 == 0) to int8 blocks: act[k], d[k/32], s[k/32] (code sums). */
void EF(quantize_row)(int k, const float *x, int8_t *act, float *d, int32_t *z) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int b = 0; b < k / 32; b++) {
        const float *p = x + 32 * b;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(p + 8 * i), m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i]));
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h), scale = amax / 127.0f;
        const __m256 div = _mm256_set1_ps(scale == 0.0f ? 1.0f : scale);
        __m256i q[4];
        for (int i = 0; i < 4; i++) q[i] = _mm256_cvtps_epi32(_mm256_div_ps(v[i], div)); /* MXCSR: half to even */
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
        const __m256i bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
        _mm256_storeu_si256((__m256i *)(act + 32 * b), bytes);
        d[b] = scale, z[b] = _mm_cvtsi128_si32(s4);
    }
}

/* acc[c] (8 rows) += the group's rows . activation row c, over all nb blocks; R activation rows. */
static inline __attribute__((always_inline)) void micro4(const int R, int nb, const uint8_t *w, const int8_t *act,
                                                         const float *d, const int32_t *z, size_t k, __m256 *acc,
                                                         int prefetch) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < R; c++) acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++, w += BLOCK_BYTES_4) {
        if (prefetch) {
            _mm_prefetch((const char *)(w + PREFETCH_AHEAD), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + PREFETCH_AHEAD + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(w + PREFETCH_AHEAD + 128), _MM_HINT_T0);
        }
        const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
        __m256i q[8];
        for (int j = 0; j < 4; j++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * j));
            q[2 * j] = _mm256_and_si256(raw, m4), q[2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        }
        for (int c = 0; c < R; c++) {
            const int8_t *a = act + c * k + 32 * b;
            __m256i t = _mm256_set1_epi32(-8 * z[c * (k / 32) + b]);
            for (int j = 0; j < 4; j++) t = dot4(dot4(t, q[2 * j], a + 8 * j), q[2 * j + 1], a + 8 * j + 4);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(ws, _mm256_set1_ps(d[c * (k / 32) + b])), acc[c]);
        }
    }
}

/* 8-bit codes: VNNI takes them unsigned with the zero point 128 through the seed. AVX2's maddubs
 * would overflow on 255 x 127 x 2, so it takes q = code - 128 as |q| (unsigned, up to 128) times the
 * activation with q's sign (|a| <= 127 never overflows when negated): at most 128 x 127 x 2.
 * w: the codes (VNNI) or |q| (AVX2); sw: q (AVX2, for its signs). */
static inline __m256i dot4_q8(__m256i acc, __m256i w, __m256i sw, const int8_t *a) {
    const __m256i x = _mm256_set1_epi32(*(const int32_t *)a);
#ifdef EF_VNNI
    (void)sw;
    return _mm256_dpbusd_epi32(acc, w, x);
#else
    const __m256i p = _mm256_maddubs_epi16(w, _mm256_sign_epi8(x, sw));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void micro8(const int R, int nb, const uint8_t *w, const int8_t *act,
                                                          const float *d, const int32_t *z, size_t k, __m256 *acc,
                                                          int prefetch) {
    for (int c = 0; c < R; c++) acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++, w += BLOCK_BYTES_8) {
        if (prefetch)
            for (int q = 0; q < BLOCK_BYTES_8; q += 64) _mm_prefetch((const char *)(w + 2 * PREFETCH_AHEAD + q), _MM_HINT_T0);
        const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w));
        __m256i q[8], sq[8];
        for (int j = 0; j < 8; j++) {
            q[j] = sq[j] = _mm256_loadu_si256((const __m256i *)(w + 16 + 32 * j));
#ifndef EF_VNNI
            sq[j] = _mm256_xor_si256(q[j], _mm256_set1_epi8((char)0x80));
            q[j] = _mm256_abs_epi8(sq[j]);
#endif
        }
        for (int c = 0; c < R; c++) {
            const int8_t *a = act + c * k + 32 * b;
#ifdef EF_VNNI
            __m256i t = _mm256_set1_epi32(-128 * z[c * (k / 32) + b]);
#else
            __m256i t = _mm256_setzero_si256();
#endif
            for (int j = 0; j < 8; j++) t = dot4_q8(t, q[j], sq[j], a + 4 * j);
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(ws, _mm256_set1_ps(d[c * (k / 32) + b])), acc[c]);
        }
    }
}

static inline void store_rows(float *y, int rows, __m256 v) {
    if (rows == 8) {
        _mm256_storeu_ps(y, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy(y, tmp, (size_t)rows * sizeof(float));
    }
}

/* y[c * n + r] for activation rows c in [0, m) and weight rows r of groups [g0, g1) (r < n), for
 * 4- or 8-bit weights. act/d/s: m rows of k bytes / k/32 floats / k/32 ints. Activation rows are
 * taken in panels so that a panel's int8 rows stay in cache while every group of the range meets them. */
#define MATMUL(NAME, MICRO, BLOCK)                                                                               \
    void EF(NAME)(int n, int k, const uint8_t *w, int g0, int g1, int m, const int8_t *act, const float *d,     \
                  const int32_t *s, float *y) {                                                                 \
        const int nb = k / 32;                                                                                  \
        const size_t gb = (size_t)nb * BLOCK, kk = (size_t)k;                                                   \
        const int fit = (int)(PANEL_BYTES / kk) / RN * RN, panel = m == 1 ? 1 : fit > RN ? fit : RN;            \
        __m256 acc[RN];                                                                                         \
        for (int c0 = 0; c0 < m; c0 += panel) {                                                                 \
            const int c1 = c0 + panel < m ? c0 + panel : m;                                                     \
            for (int g = g0; g < g1; g++) {                                                                     \
                const uint8_t *wg = w + (size_t)g * gb;                                                         \
                const int rows = n - 8 * g < 8 ? n - 8 * g : 8;                                                 \
                int c = c0;                                                                                     \
                for (; c + RN <= c1; c += RN) {                                                                 \
                    MICRO(RN, nb, wg, act + c * kk, d + c * (kk / 32), s + c * (kk / 32), kk, acc, 0);          \
                    for (int i = 0; i < RN; i++) store_rows(y + (size_t)(c + i) * n + 8 * g, rows, acc[i]);     \
                }                                                                                               \
                for (; c < c1; c++) {                                                                           \
                    MICRO(1, nb, wg, act + c * kk, d + c * (kk / 32), s + c * (kk / 32), kk, acc, m == 1);      \
                    store_rows(y + (size_t)c * n + 8 * g, rows, acc[0]);                                        \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

MATMUL(matmul_q4, micro4, BLOCK_BYTES_4)
MATMUL(matmul_q8, micro8, BLOCK_BYTES_8)
