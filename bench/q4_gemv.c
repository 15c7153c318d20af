/* A q4 decode kernel (matrix x vector) for x86 AVX2, to measure what ONNX Runtime's MatMulNBits leaves
 * on the table at decode (bench/q4_gemv.py drives it; docs/notes/onnx.md, Session 15, has the numbers).
 *
 * Weights: edgeforge's q4 (blocks of 32 along K, 4-bit codes with zero point 8, one fp16 scale a block),
 * repacked once into a single stream per 4 rows: for every 8 blocks, the 4 rows' 8 fp16 scales (64 B),
 * then 4 block pairs x 4 rows x 32 B of codes (low nibble = even element, as in the bundle's blob).
 * 18 bytes a block: the bundle's 4.5 bits a weight, read front to back with a software prefetch.
 *
 * Activations: int8 per block of 32 (scale = max|x| / 127, round half to even), the arithmetic
 * MatMulNBits uses at accuracy_level 4; stored as the even and odd elements of two neighbouring blocks
 * so that one 32-byte load of codes (two blocks) meets two 32-byte loads of activations.
 *
 * y[n] = sum_b s[n,b] * d[b] * (sum_j q[n,b,j] * a[b,j]) - sum_b s[n,b] * (8 * d[b] * sum_j a[b,j])
 * (the zero point comes out as one dot product of the row's scales with a per-block vector).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define TILE_BYTES 576 /* 8 blocks x 4 rows: 64 B scales + 512 B codes */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES (16 * TILE_BYTES) /* measured best of 2, 4, 8, 16, 32 tiles ahead here */
#endif

/* blob: uint8 [n, k/32, 16]; scales: fp16 [n, k/32]; out: n*k/32*18 bytes. n % 4 == 0, k % 256 == 0. */
void q4_pack(int n, int k, const uint8_t *blob, const uint16_t *scales, uint8_t *out) {
    const int nb = k / 32;
    for (int r = 0; r < n; r += 4)
        for (int b8 = 0; b8 < nb; b8 += 8) {
            for (int i = 0; i < 4; i++, out += 16) memcpy(out, scales + (size_t)(r + i) * nb + b8, 16);
            for (int p = 0; p < 4; p++)
                for (int i = 0; i < 4; i++, out += 32) memcpy(out, blob + ((size_t)(r + i) * nb + b8 + 2 * p) * 16, 32);
        }
}

/* x float [k] -> lo/hi int8 [k/2] each, d float [k/32], c float [k/32] = 8 * d * sum(block codes). */
void q4_quantize_activations(int k, const float *x, int8_t *lo, int8_t *hi, float *d, float *c) {
    for (int b = 0; b < k / 32; b++) {
        float amax = 0.f;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[b * 32 + j]));
        const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int sum = 0;
        int8_t *l = lo + (b / 2) * 32 + (b % 2) * 16, *h = hi + (b / 2) * 32 + (b % 2) * 16;
        for (int j = 0; j < 16; j++) {
            const int e = (int)nearbyintf(x[b * 32 + 2 * j] * inv), o = (int)nearbyintf(x[b * 32 + 2 * j + 1] * inv);
            l[j] = (int8_t)e, h[j] = (int8_t)o, sum += e + o;
        }
        d[b] = scale, c[b] = 8.f * scale * (float)sum;
    }
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_add_ss(a, _mm_movehdup_ps(a)));
}

/* rows [r0, r1) of y = W x; r0, r1 multiples of 4. */
void q4_gemv_rows(int k, const uint8_t *packed, const int8_t *lo, const int8_t *hi, const float *d, const float *c,
                  float *y, int r0, int r1) {
    const int nb = k / 32;
    const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    const __m256i pick[4] = {_mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3),
                             _mm256_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5), _mm256_setr_epi32(6, 6, 6, 6, 7, 7, 7, 7)};
    for (int r = r0; r < r1; r += 4) {
        const uint8_t *t = packed + (size_t)r * nb * 18;
        __m256 acc[4], zacc[4];
        for (int i = 0; i < 4; i++) acc[i] = zacc[i] = _mm256_setzero_ps();
        for (int b8 = 0; b8 < nb; b8 += 8, t += TILE_BYTES) {
            for (int q = 0; q < TILE_BYTES; q += 64) _mm_prefetch((const char *)(t + PREFETCH_BYTES + q), _MM_HINT_T0);
            const __m256 d8 = _mm256_loadu_ps(d + b8), c8 = _mm256_loadu_ps(c + b8);
            __m256 s8[4];
            for (int i = 0; i < 4; i++) {
                const __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(t + 16 * i)));
                s8[i] = _mm256_mul_ps(ws, d8);
                zacc[i] = _mm256_fmadd_ps(ws, c8, zacc[i]);
            }
            for (int p = 0; p < 4; p++) {
                const int b = b8 + 2 * p;
                const __m256i al = _mm256_loadu_si256((const __m256i *)(lo + b * 16));
                const __m256i ah = _mm256_loadu_si256((const __m256i *)(hi + b * 16));
                for (int i = 0; i < 4; i++) {
                    const __m256i raw = _mm256_loadu_si256((const __m256i *)(t + 64 + p * 128 + i * 32));
                    const __m256i ql = _mm256_and_si256(raw, m4), qh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
                    /* codes 0..15 x int8: each int16 pair sum is at most 2 * 15 * 128, so lo + hi cannot overflow */
                    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(ql, al), _mm256_maddubs_epi16(qh, ah));
                    const __m256 dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones));
                    acc[i] = _mm256_fmadd_ps(dot, _mm256_permutevar8x32_ps(s8[i], pick[p]), acc[i]);
                }
            }
        }
        for (int i = 0; i < 4; i++) y[r + i] = hsum(acc[i]) - hsum(zacc[i]);
    }
}

/* y = W x over `threads` OpenMP threads (rows split in multiples of 4). */
void q4_gemv(int n, int k, const uint8_t *packed, const int8_t *lo, const int8_t *hi, const float *d, const float *c,
             float *y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int id = 0, nt = 1;
#ifdef _OPENMP
        id = omp_get_thread_num(), nt = omp_get_num_threads();
#endif
        const int per = (n / 4 + nt - 1) / nt * 4, r0 = id * per, r1 = r0 + per > n ? n : r0 + per;
        if (r0 < r1) q4_gemv_rows(k, packed, lo, hi, d, c, y, r0, r1);
    }
}
