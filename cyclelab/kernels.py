"""The engine's own kernels, in C: decode's matrix-vector products (float32 weights, and int8 weights
with a float32 scale per row), attention for one query position, and two fused elementwise steps.

Decode multiplies one vector by every weight matrix, so its time is the time to *read* the
matrices. On this course's CPUs torch's own float32 GEMV (``torch.mv``, or ``F.linear`` with one row)
reads weights at about half the speed a plain AVX2 loop does (chapter 07 measures both), and
torch 2.13 ships no fast weight-only int8 kernel for x86 CPUs without AVX-512
(``torch._weight_int8pack_mm`` is several times slower than a float32 GEMV there, and the fbgemm
kernels behind ``quantize_dynamic`` also round the *activations* to 8 bits, which costs SmolLM2 far
more perplexity than rounding its weights). The rest of a decode step is small arithmetic on a few
vectors, where each torch op costs more in dispatch than in work, so there fewer calls are the gain.

So this module compiles about 220 lines of C (AVX2, FMA, OpenMP) with the system's C compiler on first
use, into the temporary folder, and calls it through ``ctypes``. Each output is one thread's dot product,
summed in a fixed order, so the result does not depend on the number of threads.

* :func:`f32_linears`, :func:`f32_conv1d`: four float32 accumulators of 8 lanes, fused multiply-adds, for
  weights stored (out, in) and GPT-2's (in, out); one call reads several matrices (Llama's q, k and v).
* :func:`int8_linears`: each input row is stored in 16 bits for the multiply (one scale per row:
  ``max|x| / 32767``, a relative rounding of at most 1/65534 of the row's largest value, far below the
  int8 weights' own), so the products are integer multiply-adds.
* :func:`fused_scores`, :func:`fused_softmax`, :func:`fused_mix`: attention of one new position against
  the KV cache, one call per op instead of several torch ops each (grouped-query heads read their key
  head in place, as :mod:`cyclelab.attend` does).
* :func:`fused_rms_norm`, :func:`fused_rope`: one call each instead of several torch ops, the same formulas
  as :mod:`cyclelab.norms` and :mod:`cyclelab.rope`.

Wherever a kernel does not apply (no compiler, another CPU, gradients, other dtypes or devices), the torch
formula runs instead (``F.linear``, ``torch._weight_int8pack_mm``, :mod:`cyclelab.attend`…): the same
numbers, more slowly. Inputs of many rows (prefill, perplexity) are faster as torch's matrix-matrix product:
the kernels stop at :data:`MANY_ROWS`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import torch

_OWN_F32 = [True]  # False inside torch_float32(): the float32 products go to torch
PER_THREAD = 1 << 16  #: multiply-adds a thread is worth waking for
MANY_ROWS = 8  #: from this many input rows on, use torch's float32 matmul (an int8 weight dequantized first)

SOURCE = r"""
#include <immintrin.h>
#include <math.h>
#include <omp.h>
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
"""


_PTR, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # each kernel's C arguments (a matrix kernel's "threads" is an int)
    "f32_linear": [_PTR] * 4 + [_I64, _PTR, _I64, _I64, _INT],  # x, w[], bias[], n[], total, y[], rows, k, threads
    "f32_conv1d": [_PTR] * 4 + [_I64] * 3 + [_INT],
    "int8_linear": [_PTR] * 5 + [_I64, _PTR, _I64, _I64, _INT],
    "f32_rms_norm": [_PTR] * 3 + [_I64] * 2 + [ctypes.c_float],
    "f32_rope": [_PTR] * 4 + [_I64] * 2,
    "f32_scores": [_PTR] * 3 + [_I64] * 7,
    "f32_softmax": [_PTR] * 2 + [_I64] * 2,
    "f32_mix": [_PTR] * 3 + [_I64] * 7,
}


@lru_cache(maxsize=1)
def compiled() -> ctypes.CDLL | None:
    """The kernels, compiled once per source version into the temporary folder; None if they cannot be built here."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or not torch.backends.cpu.get_cpu_capability().startswith("AVX"):
        return None
    digest = hashlib.sha256(SOURCE.encode()).hexdigest()[:16]
    library = Path(tempfile.gettempdir()) / f"cyclelab-kernels-{digest}-{os.getuid()}.so"
    if not library.exists():
        source = library.with_suffix(f".{os.getpid()}.c")
        source.write_text(SOURCE)
        partial = library.with_suffix(f".{os.getpid()}.partial")
        try:
            flags = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
            subprocess.run([compiler, *flags, str(source), "-lm", "-o", str(partial)], check=True, capture_output=True,
                           timeout=120)
            partial.replace(library)  # atomic: another process never loads half a file
        except (OSError, subprocess.SubprocessError):
            return None
        finally:
            source.unlink(missing_ok=True)
            partial.unlink(missing_ok=True)
    lib = ctypes.CDLL(str(library))
    for name, arguments in _SIGNATURES.items():
        kernel = getattr(lib, name)
        kernel.argtypes, kernel.restype = arguments, None
    return lib


@contextmanager
def torch_float32() -> Iterator[None]:
    """Inside the block the float32 products run on torch's kernels instead of these (chapter 07 and the
    benchmarks time the engine both ways)."""
    before, _OWN_F32[0] = _OWN_F32[0], False
    try:
        yield
    finally:
        _OWN_F32[0] = before


def f32_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T + bias`` for a weight stored (out, in), as ``torch.nn.functional.linear`` computes it: by the
    C kernel for fewer than :data:`MANY_ROWS` rows of float32 on the CPU when no gradient is wanted, else by torch."""
    return f32_linears(x, [(w, bias)])[0]


def f32_linears(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> list[torch.Tensor]:
    """:func:`f32_linear` of ``x`` with each ``(weight, bias)`` of ``layers``: one C call reads all the weights
    (decode's q, k and v) where the kernel applies to every one of them, else torch computes each."""
    if not _fits_f32_kernel(x, layers, 1):
        return [torch.nn.functional.linear(x, w, b) for w, b in layers]
    ns = [w.shape[0] for w, _ in layers]
    outs, total = [torch.empty(*x.shape[:-1], n) for n in ns], sum(ns)
    weights, biases, sizes = _weight_arrays(ns, *zip(*layers))
    compiled().f32_linear(x.data_ptr(), weights, biases, sizes, total, _pointers(outs), x.numel() // x.shape[-1],
                          x.shape[-1], _threads(x.numel() * total))
    return outs


def f32_conv1d(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w + bias`` for a weight stored (in, out), GPT-2's ``Conv1D``: by the C kernel where
    :func:`f32_linear` would use it, else by torch (``addmm``)."""
    if not _fits_f32_kernel(x, [(w, bias)], 0):
        flat = x.reshape(-1, x.shape[-1])
        out = flat @ w if bias is None else torch.addmm(bias, flat, w)
        return out.view(*x.shape[:-1], w.shape[-1])
    k, n = w.shape
    out = torch.empty(*x.shape[:-1], n)
    compiled().f32_conv1d(x.data_ptr(), w.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                          x.numel() // k, k, n, _threads(x.numel() * n))
    return out


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """:func:`cyclelab.norms.rms_norm`'s formula in one C call for a few float32 rows (decode); None where
    the kernel does not apply (the caller runs that function)."""
    d = x.shape[-1] if x.dim() else 0
    if not (weight.shape == (d,) and 0 < x.numel() < MANY_ROWS * d and _plain_f32(x, weight)):
        return None
    out = torch.empty_like(x)
    compiled().f32_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // d, d, eps)
    return out


def fused_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """:func:`cyclelab.rope.apply_rope` in one C call for float32 heads at one position (decode), to the last
    bit (each product and sum rounds as torch's do); None where the kernel does not apply."""
    d = x.shape[-1] if x.dim() else 0
    one_position = x.dim() == 4 and x.shape[-2] == 1 and cos.shape == sin.shape == (1, d) and d % 2 == 0
    if not (one_position and _plain_f32(x, cos, sin)):
        return None
    out = torch.empty_like(x)
    compiled().f32_rope(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), x.numel() // d, d)
    return out


def fused_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
    """:func:`cyclelab.attend.attention_scores` for one query position (decode) in one C call: ``q``
    ``(b, h, 1, d)``, ``keys`` ``(b, kv_h, t, d)`` as the KV cache hands them out; None where it does not apply."""
    if not _one_query(q, keys):
        return None
    b, h, _, d = q.shape
    scores = torch.empty(b, h, 1, keys.shape[-2])
    compiled().f32_scores(q.data_ptr(), keys.data_ptr(), scores.data_ptr(), b, h, h // keys.shape[1],
                          keys.shape[-2], d, keys.stride(0), keys.stride(1))
    return scores


def fused_softmax(scores: torch.Tensor) -> torch.Tensor | None:
    """The softmax over the last dimension of one query position's float32 scores ``(b, h, 1, t)`` in one C
    call; None where it does not apply."""
    if not (scores.dim() == 4 and scores.shape[-2] == 1 and scores.shape[-1] > 0 and _plain_f32(scores)):
        return None
    probs = torch.empty_like(scores)
    compiled().f32_softmax(scores.data_ptr(), probs.data_ptr(), scores.numel() // scores.shape[-1], scores.shape[-1])
    return probs


def fused_mix(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor | None:
    """:func:`cyclelab.attend.attention_mix` for one query position in one C call: ``probs`` ``(b, h, 1, t)``,
    ``values`` ``(b, kv_h, t, d)`` as the KV cache hands them out; None where it does not apply."""
    t = values.shape[-2] if values.dim() == 4 else -1
    if not _one_query(probs, values, width=t):  # a weight for each of the t values
        return None
    (b, h), d = probs.shape[:2], values.shape[-1]
    out = torch.empty(b, h, 1, d)
    compiled().f32_mix(probs.data_ptr(), values.data_ptr(), out.data_ptr(), b, h, h // values.shape[1], t, d,
                       values.stride(0), values.stride(1))
    return out


def _one_query(q: torch.Tensor, kv: torch.Tensor, width: int | None = None) -> bool:
    """True where the attention kernels read ``q`` ``(b, h, 1, width)`` against a cache slice ``kv``
    ``(b, kv_h, t, d)``: kv_h divides h, ``q`` is :func:`_plain_f32`, and ``kv``'s rows are float32 d values apart."""
    if not (q.dim() == kv.dim() == 4 and q.shape[-2] == 1 and q.shape[0] == kv.shape[0] and kv.shape[1]):
        return False
    d = kv.shape[-1]
    if q.shape[1] % kv.shape[1] or q.shape[-1] != (d if width is None else width) or kv.shape[-2] == 0:
        return False
    rows_packed = kv.stride(-1) == 1 and kv.stride(-2) == d
    return rows_packed and _plain_f32(q) and _plain_f32(kv, contiguous=False)


def _pointers(tensors: Iterable[torch.Tensor | None]) -> ctypes.Array:
    """The tensors' data pointers as a C array (None for a missing bias)."""
    addresses = [None if t is None else t.data_ptr() for t in tensors]
    return (_PTR * len(addresses))(*addresses)


_WEIGHT_ARRAYS: dict[tuple, tuple[ctypes.Array, ...]] = {}  # sizes and addresses -> the C arrays of them


def _weight_arrays(sizes: Sequence[int], *columns: Sequence[torch.Tensor | None]) -> tuple[ctypes.Array, ...]:
    """The C arrays of a product's weights: the addresses of each column of tensors (weights, scales, biases),
    then the matrices' output sizes. Decode passes the same weights every cycle, so each set of addresses
    and sizes is turned into arrays once (building a C array costs microseconds)."""
    key = (*sizes, *(None if t is None else t.data_ptr() for column in columns for t in column))
    arrays = _WEIGHT_ARRAYS.get(key)
    if arrays is None:
        if len(_WEIGHT_ARRAYS) >= 4096:  # weights that keep moving (a training loop's new tensors): start over
            _WEIGHT_ARRAYS.clear()
        arrays = _WEIGHT_ARRAYS[key] = (*map(_pointers, columns), (_I64 * len(sizes))(*sizes))
    return arrays


def _threads(multiply_adds: int) -> int:
    """Threads for one kernel call: torch's setting, but never more than the cores this process may run on
    (an extra thread would wait for a core at every call) nor than the work is worth."""
    return max(1, min(torch.get_num_threads(), _cores(), multiply_adds // PER_THREAD))


@lru_cache(maxsize=1)
def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _fits_f32_kernel(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor | None]], in_dim: int) -> bool:
    """True where a float32 product's C kernel computes ``x`` times every ``(weight, bias)`` of ``layers``: fewer than
    :data:`MANY_ROWS` rows of ``x``, each weight's dimension ``in_dim`` as wide as a row and its bias as long as its
    other, all :func:`_plain_f32`. (A few µs: it runs on every call of decode; torch raises the shape errors of the
    other calls.)"""
    width = x.shape[-1] if x.dim() else 0
    if not (layers and 0 < x.numel() < MANY_ROWS * width):
        return False
    tensors = [x]
    for w, bias in layers:
        if not (w.dim() == 2 and w.shape[in_dim] == width):
            return False
        if bias is not None:
            if bias.shape != (w.shape[1 - in_dim],):
                return False
            tensors.append(bias)
        tensors.append(w)
    return _plain_f32(*tensors)


def _plain_f32(*tensors: torch.Tensor, contiguous: bool = True) -> bool:
    """True if the C kernels may read these tensors' memory: contiguous (unless told otherwise) float32 on the
    CPU, no gradient to record, no dispatch mode watching torch's ops (FlopCounterMode, fake tensors), kernels
    compiled and on."""
    for t in tensors:
        if t.dtype is not torch.float32 or not t.is_cpu or (contiguous and not t.is_contiguous()):
            return False
        if t.requires_grad and torch.is_grad_enabled():
            return False
    return _OWN_F32[0] and not torch._C._len_torch_dispatch_stack() and compiled() is not None


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (q × scale).T + bias`` for float32 ``x`` ``(..., in)``, int8 ``q`` ``(out, in)``, float32 ``scale`` ``(out,)``."""
    return int8_linears(x, [(q, scale, bias)])[0]


def int8_linears(x: torch.Tensor, layers: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
                 ) -> list[torch.Tensor]:
    """:func:`int8_linear` of ``x`` with each ``(q, scale, bias)`` of ``layers``, all the weights read by one C call
    for a few rows (decode); many rows dequantize each weight for torch's matrix product."""
    width = layers[0][0].shape[1]
    if x.dtype != torch.float32:
        raise TypeError(f"an int8 Linear takes float32 inputs, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != width:
        raise ValueError(f"an int8 Linear of {width} inputs got a tensor of shape {tuple(x.shape)}: "
                         f"its last dimension must be {width}")
    rows, ns = x.numel() // width, [q.shape[0] for q, _, _ in layers]
    if rows < MANY_ROWS and compiled() is not None:
        x, outs, total = x.contiguous(), [torch.empty(*x.shape[:-1], n) for n in ns], sum(ns)
        compiled().int8_linear(x.data_ptr(), *_weight_arrays(ns, *zip(*layers)), total, _pointers(outs), rows, width,
                               _threads(x.numel() * total))
        return outs
    flat = x.reshape(-1, width)
    if flat.shape[0] >= MANY_ROWS:  # many rows: torch's matrix product, each weight dequantized
        outs = [torch.nn.functional.linear(flat, q.float() * scale[:, None], b) for q, scale, b in layers]
    else:  # no compiler: torch's own weight-only int8 op
        outs = [torch._weight_int8pack_mm(flat, q, scale) for q, scale, _ in layers]
        outs = [out if b is None else out + b for out, (_, _, b) in zip(outs, layers)]
    return [out.view(*x.shape[:-1], n) for out, n in zip(outs, ns)]


class Int8Linear(torch.nn.Module):
    """A Linear whose weight is stored as int8 codes ``q`` ``(out, in)`` with a float32 scale per row
    (:func:`cyclelab.quantize.int8_linear_of` makes one from a float weight); it computes
    ``x @ (q × scale).T + bias`` with :func:`int8_linear`, without a float copy of the weight."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("q", q.contiguous())
        self.register_buffer("scale", scale.reshape(-1).float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_linear(x, self.q, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, float32 scale per row"


def quantize_symmetric(w: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in [-levels, levels] and one scale per row of ``w`` (a zero row gets scale 1)."""
    absmax = w.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / levels, torch.ones_like(absmax))
    q = torch.round(w / scale).clamp(-levels, levels).to(torch.int8)
    return q, scale


def is_int8(module: torch.nn.Module) -> bool:
    """True for a Linear whose weight is stored as int8 (:class:`Int8Linear`)."""
    return isinstance(module, Int8Linear)


def to_int8(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every Linear (and GPT-2 ``Conv1D``) of ``model``, in place, by an :class:`Int8Linear`; return ``model``.

    Each weight is quantized per output row, symmetric (``scale = max|w| / 127``, codes
    ``round(w / scale)``: :func:`quantize_symmetric`, the chapter-07 recipe); the float weight
    is dropped. Embeddings and norms stay float32. A tied unembedding (GPT-2's and SmolLM2's ``lm_head``
    shares the embedding's matrix) gets int8 codes of its own, a quarter of the float matrix's bytes,
    and the embedding keeps the float matrix for its row lookups.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"to_int8 converts a torch.nn.Module (e.g. load('tiny').model), got {type(model).__name__}")
    if any(is_int8(m) for m in model.modules()):
        raise ValueError("the model is already int8: to_int8 converts a float32 model once")
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or p.device.type != "cpu" for p in params):
        found = sorted({f"{p.dtype} on {p.device}" for p in params})
        raise ValueError(f"to_int8 needs a float32 model on the CPU (the int8 kernel is a CPU kernel), "
                         f"got {', '.join(found)}; load it with dtype=torch.float32, device='cpu'")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            kind = type(child).__name__
            if kind in ("Linear", "Conv1D"):
                weight = child.weight.detach()
                setattr(parent, name, _rows_to_int8(weight.t() if kind == "Conv1D" else weight, child.bias))  # Conv1D: (in, out)
    for p in model.parameters():  # what stays float leaves the weights file's memory map, and the float
        p.data = p.data.clone()   # matrices' pages go with the map instead of staying resident
    return model


def _rows_to_int8(w: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    """``w`` ``(out, in)`` quantized per row, symmetric, as an :class:`Int8Linear` (a zero row gets scale 1)."""
    if not torch.isfinite(w).all():
        raise ValueError("to_int8: a weight holds inf or NaN, which no scale can represent")
    return Int8Linear(*quantize_symmetric(w, 127), bias)

