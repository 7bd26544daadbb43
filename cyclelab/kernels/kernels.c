/* cyclelab's own kernels: decode's matrix-vector products (float32 weights, and int8 weights with a float32
   scale per row), attention of one query position, RMSNorm and RoPE. Built by cyclelab/kernels/build.py into a
   private per-user folder with AVX2, FMA and (where the compiler has it) OpenMP; each output is one thread's
   dot product summed in a fixed order, so results do not depend on the number of threads. */
#include <immintrin.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#else /* a compiler without OpenMP (Apple clang): one thread, the same sums in the same order */
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif
#include <stdint.h>
#include <stdlib.h>

/* Weights are read once per token: prefetch them "non-temporal", so that streaming megabytes of them
   does not evict from the caches what the rest of the step (torch's own code and data) keeps using. */
static inline void ahead(const void *p, int bytes) {
    for (int b = 0; b < bytes; b += 64) _mm_prefetch((const char *)p + b, _MM_HINT_NTA);
}

static float hsum(__m256 v) {  /* the 8 lanes added */
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_hadd_ps(h, h);
    return _mm_cvtss_f32(_mm_hadd_ps(h, h));
}

/* Output j of the matrices side by side: which matrix (*i), and its row in that matrix (the return value). */
static int64_t locate(int64_t j, const int64_t *n, int *i) {
    for (*i = 0; j >= n[*i]; ++*i) j -= n[*i];
    return j;
}

/* y[i] = x @ w[i].T + bias[i] (rows x n[i]) for float32 weights w[i] stored (out, in), row-major, of
   n[0] + n[1] + ... = total outputs. One parallel loop runs over the outputs of all of them, so decode's q, k
   and v (or gate and up) cost one call and one wake-up of the threads. */
void f32_linear(const float *x, const float *const *w, const float *const *bias, const int64_t *n, int64_t total,
                float *const *y, int64_t rows, int64_t k, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < total; j++) {
        int i;
        int64_t c = locate(j, n, &i);
        const float *r = w[i] + c * k;
        for (int64_t m = 0; m < rows; m++) {
            const float *a = x + m * k;
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
            int64_t e = 0;
            for (; e + 32 <= k; e += 32) {
                ahead(r + 2 * k + e, 128);  /* two rows on */
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + e), _mm256_loadu_ps(a + e), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + e + 8), _mm256_loadu_ps(a + e + 8), s1);
                s2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + e + 16), _mm256_loadu_ps(a + e + 16), s2);
                s3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + e + 24), _mm256_loadu_ps(a + e + 24), s3);
            }
            float dot = hsum(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
            for (; e < k; e++) dot += a[e] * r[e];
            y[i][m * n[i] + c] = dot + (bias[i] ? bias[i][c] : 0.0f);
        }
    }
}

/* y[m, n] = sum_k x[m, k] w[k, n] + bias[n] for float32 w stored (in, out): GPT-2's Conv1D layout. Each thread
   owns a range of output columns and walks down the k rows of w, adding x[m, i] * w[i, its columns] into its
   outputs, so the weights are read in the order they are stored (each output still sums over k in order). */
void f32_conv1d(const float *x, const float *w, const float *bias, float *y,
                int64_t rows, int64_t k, int64_t n, int threads) {
    int64_t blocks = (n + 7) / 8;
    #pragma omp parallel num_threads(threads)
    {
        int id = omp_get_thread_num(), parts = omp_get_num_threads();
        int64_t first = 8 * (blocks * id / parts), end = 8 * (blocks * (id + 1) / parts);
        if (end > n) end = n;
        for (int64_t m = 0; m < rows; m++)
            for (int64_t c = first; c < end; c++) y[m * n + c] = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            const float *r = w + i * n;
            ahead(r + 2 * n + first, (int)(4 * (end - first)));  /* two rows on */
            for (int64_t m = 0; m < rows; m++) {
                float *out = y + m * n;
                __m256 a = _mm256_set1_ps(x[m * k + i]);
                int64_t c = first;
                for (; c + 8 <= end; c += 8)
                    _mm256_storeu_ps(out + c, _mm256_fmadd_ps(_mm256_loadu_ps(r + c), a, _mm256_loadu_ps(out + c)));
                for (; c < end; c++) out[c] = fmaf(r[c], x[m * k + i], out[c]);
            }
        }
        for (int64_t m = 0; m < rows && bias; m++)
            for (int64_t c = first; c < end; c++) y[m * n + c] += bias[c];
    }
}

/* y[m, :] = w * (x[m, :] / sqrt(mean(x[m, :]^2) + eps)): RMSNorm of each row, in one call instead of
   six torch ops (cyclelab/norms.py writes the same formula in torch). */
void f32_rms_norm(const float *x, const float *w, float *y, int64_t rows, int64_t d, float eps) {
    for (int64_t m = 0; m < rows; m++) {
        const float *a = x + m * d;
        float *out = y + m * d;
        __m256 s = _mm256_setzero_ps();
        int64_t i = 0;
        for (; i + 8 <= d; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(a + i), s);
        float squares = hsum(s);
        for (; i < d; i++) squares += a[i] * a[i];
        float r = 1.0f / sqrtf(squares / (float)d + eps);
        for (i = 0; i < d; i++) out[i] = w[i] * (a[i] * r);
    }
}

/* y = x cos + rotate_half(x) sin for each of `heads` vectors of d values at one position: pairs (i, i + d/2)
   turn by the angle of i (cyclelab/rope.py writes the same in torch; each value rounds as torch's ops do). */
void f32_rope(const float *x, const float *cos, const float *sin, float *y, int64_t heads, int64_t d) {
    int64_t half = d / 2;
    for (int64_t h = 0; h < heads; h++) {
        const float *a = x + h * d;
        float *out = y + h * d;
        for (int64_t i = 0; i < half; i++) {
            float first = a[i] * cos[i], second = a[i + half] * cos[i + half];
            float turn_first = -a[i + half] * sin[i], turn_second = a[i] * sin[i + half];
            out[i] = first + turn_first;
            out[i + half] = second + turn_second;
        }
    }
}

/* For int8 weights q[i] (out, in) with a float32 scale per row, of n[0] + n[1] + ... = total outputs:
   y[i][m, c] = xs[m] scale[i][c] sum_k xq[m, k] q[i][c, k] + bias[i][c], where xq = round(x / xs) is row m of x in
   16 bits (xs = max|x[m]| / 32767). int16 x int8 products are summed in int32 by vpmaddwd, 16 codes a step;
   the int32 sums move to float every 2048 values, long before they could overflow. As in f32_linear, all
   the matrices' outputs share one parallel loop. */
void int8_linear(const float *x, const int8_t *const *q, const float *const *scale, const float *const *bias,
                 const int64_t *n, int64_t total, float *const *y, int64_t rows, int64_t k, int threads) {
    int16_t *xq = malloc(sizeof(int16_t) * rows * (k + 32));
    float *xs = malloc(sizeof(float) * rows);
    for (int64_t m = 0; m < rows; m++) {
        float amax = 0.0f;
        for (int64_t e = 0; e < k; e++) amax = fmaxf(amax, fabsf(x[m * k + e]));
        xs[m] = amax > 0.0f ? amax / 32767.0f : 1.0f;
        for (int64_t e = 0; e < k; e++) xq[m * (k + 32) + e] = (int16_t)lrintf(x[m * k + e] / xs[m]);
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < total; j++) {
        int i;
        int64_t c = locate(j, n, &i);
        const int8_t *w = q[i] + c * k;
        for (int64_t m = 0; m < rows; m++) {
            const int16_t *a = xq + m * (k + 32);
            __m256 acc = _mm256_setzero_ps();
            int64_t e = 0;
            while (e + 32 <= k) {
                __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
                int64_t end = e + 2048 < k ? e + 2048 : k;
                for (; e + 32 <= end; e += 32) {
                    ahead(w + 2 * k + e, 32);  /* two rows on */
                    __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + e)));
                    __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + e + 16)));
                    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)(a + e))));
                    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(a + e + 16))));
                }
                acc = _mm256_add_ps(acc, _mm256_cvtepi32_ps(_mm256_add_epi32(s0, s1)));
            }
            float sum = hsum(acc);
            for (; e < k; e++) sum += (float)a[e] * w[e];
            y[i][m * n[i] + c] = sum * xs[m] * scale[i][c] + (bias[i] ? bias[i][c] : 0.0f);
        }
    }
    free(xq);
    free(xs);
}

/* scores[b, h, t] = q[b, h] . keys[b, h / group, t] / sqrt(d) for one query position of `heads` heads, where
   `group` query heads share a key head (grouped-query attention; 1 for multi-head). The keys of key head g
   start at keys + b * batch_stride + g * head_stride, one row of d values per position. */
void f32_scores(const float *q, const float *keys, float *scores, int64_t batch, int64_t heads, int64_t group,
                int64_t t, int64_t d, int64_t batch_stride, int64_t head_stride) {
    float root = (float)sqrt((double)d);
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++) {
            const float *a = q + (b * heads + h) * d, *key = keys + b * batch_stride + (h / group) * head_stride;
            float *out = scores + (b * heads + h) * t;
            for (int64_t p = 0; p < t; p++, key += d) {
                __m256 s = _mm256_setzero_ps();
                int64_t e = 0;
                for (; e + 8 <= d; e += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + e), _mm256_loadu_ps(key + e), s);
                float dot = hsum(s);
                for (; e < d; e++) dot += a[e] * key[e];
                out[p] = dot / root;
            }
        }
}

/* y[r, :] = softmax(x[r, :]) for each of `rows` rows of n values: exp(x - max) / sum. */
void f32_softmax(const float *x, float *y, int64_t rows, int64_t n) {
    for (int64_t r = 0; r < rows; r++) {
        const float *a = x + r * n;
        float *out = y + r * n, top = -INFINITY, sum = 0.0f;
        for (int64_t p = 0; p < n; p++) top = fmaxf(top, a[p]);
        for (int64_t p = 0; p < n; p++) sum += out[p] = expf(a[p] - top);
        for (int64_t p = 0; p < n; p++) out[p] /= sum;
    }
}

/* out[b, h] = sum_t probs[b, h, t] values[b, h / group, t] for one query position: each head's weighted
   average of its key head's values (laid out as in f32_scores). */
void f32_mix(const float *probs, const float *values, float *out, int64_t batch, int64_t heads, int64_t group,
             int64_t t, int64_t d, int64_t batch_stride, int64_t head_stride) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++) {
            const float *p = probs + (b * heads + h) * t, *v = values + b * batch_stride + (h / group) * head_stride;
            float *o = out + (b * heads + h) * d;
            for (int64_t e = 0; e < d; e++) o[e] = 0.0f;
            for (int64_t s = 0; s < t; s++, v += d)
                for (int64_t e = 0; e < d; e++) o[e] += p[s] * v[e];
        }
}
