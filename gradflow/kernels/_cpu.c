/* One-pass reductions of float32 tensors (and bfloat16 ones per layer call) for gradflow's
   CPU probes.

   A plain shared library, loaded with ctypes by gradflow/kernels/cpu.py: built at install time
   as an optional setuptools extension (setup.py), else once into a per-user cache.

   Float accumulators per block of 4096 entries (vectorisable, exact for counts), float64
   across blocks: sums of squares within ~1e-6 relative at any size (measured ~1e-6 on an
   AMD EPYC); layer outputs are summed shifted per block, so that their variance keeps that
   accuracy far from zero. Non-finite entries are
   counted in a second pass, only when the sums say there are any. The parameter functions
   take k tensors at once (arrays of pointers and sizes): one call per recorded step.

   No -march flag: the hot functions are compiled for AVX-512, AVX2 and the x86-64
   baseline, and the loader picks one per CPU at run time (GCC/clang target_clones, an
   ifunc; as fast as -march=native on a Zen 4 CPU). The weight copy streams its stores
   where the CPU has AVX. Elsewhere (other architectures, toolchains without ifunc, or
   -DGRADFLOW_PORTABLE) the same code is built once, for the compiler's baseline. */

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#if !defined(GRADFLOW_PORTABLE) && defined(__x86_64__) && defined(__linux__) &&           \
    defined(__GLIBC__) && defined(__GNUC__) && (!defined(__clang__) || __clang_major__ >= 14)
#define GF_DISPATCH 1
#include <immintrin.h>
#define GF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define GF_DISPATCH 0
#define GF_CLONES
#endif

/* Float runs of 4096 entries where the sums are vectorised over 16 lanes (AVX-512, AVX2 with
   two accumulators); 1024 for the baseline build, whose 4 lanes add longer runs each. */
#define BLOCK (GF_DISPATCH ? 4096 : 1024)

/* Sums of one block of x shifted by x0: y = x - x0 is small where x is near x0 (exact
   within a factor 2 of it), so float accumulators lose little of y's spread. */
GF_CLONES static void shifted_sums(const float *x, long i0, long i1, float x0, float *bs,
                                   float *bq, float *bz) {
    float s = 0.0f, q = 0.0f, z = 0.0f;
    for (long i = i0; i < i1; ++i) {
        float v = x[i], y = v - x0;
        s += y;
        q += y * y;
        z += (v == 0.0f) ? 1.0f : 0.0f;
    }
    *bs = s;
    *bq = q;
    *bz = z;
}

/* [sum, sum of squares, zeros, non-finite] of x. Each block is shifted by x0, the mean of
   the block before (0 for the first), and its sums rebuilt in double: sum = S + m x0,
   sum_sq = Q + 2 x0 S + m x0^2. var = sum_sq / n - mean^2 then cancels in double, not in
   float (unshifted, a mean 1700 times the std left 16 % error in the std). A block whose
   mean is more than 2 of its stds from x0 (the first block far from 0, an outlier) is
   summed again shifted by its own mean: a second pass over 16 KB in cache, not memory. */
GF_CLONES void gradflow_reduce_f32(const float *x, long n, double *out) {
    double s = 0.0, q = 0.0, z = 0.0;
    float x0 = 0.0f;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
        double m = (double)(i1 - i0);
        float bs, bq, bz;
        shifted_sums(x, i0, i1, x0, &bs, &bq, &bz);
        int finite = isfinite(bs) && isfinite(bq);
        if (finite && (double)bs * bs * 5.0 > 4.0 * m * bq) {
            x0 += (float)(bs / m);
            shifted_sums(x, i0, i1, x0, &bs, &bq, &bz);
        }
        s += bs + m * x0;
        /* y has x's NaN and Inf entries: then its sums are x's */
        q += finite ? bq + 2.0 * x0 * (double)bs + m * x0 * (double)x0 : bq;
        z += bz;
        if (finite)
            x0 += (float)(bs / m);
    }
    long bad = 0;
    if (!isfinite(s) || !isfinite(q))
        for (long i = 0; i < n; ++i)
            bad += !isfinite(x[i]);
    out[0] = s;
    out[1] = q;
    out[2] = (double)n - z; /* nonzero: NaN and Inf count */
    out[3] = (double)bad;
}

#if GF_DISPATCH
/* Copies the n entries (a multiple of 8) of x to dst (32-byte aligned) with streaming
   stores: the copy is read back only after the optimizer's pass, so it bypasses the
   caches (no read of dst's lines before writing them). Returns their sum of squares. */
__attribute__((target("avx"))) static float stream_copy_squares(const float *x, float *dst,
                                                                long n) {
    __m256 acc = _mm256_setzero_ps();
    for (long i = 0; i < n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        _mm256_stream_ps(dst + i, v);
        acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
    }
    float lanes[8], q = 0.0f;
    _mm256_storeu_ps(lanes, acc);
    for (int k = 0; k < 8; ++k)
        q += lanes[k];
    return q;
}
#endif

#if GF_DISPATCH
/* The sum of squares of n entries of x (a multiple of 32) in four independent vector
   accumulators: one accumulator's chain of dependent adds kept the pass at 1.26x the
   memory floor (gradients of 11 M parameters, 2-core AMD EPYC), four reach torch.sum's
   read speed. */
__attribute__((target("avx2,fma"))) static float fma_squares(const float *x, long n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (long i = 0; i < n; i += 32) {
        __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
        __m256 v2 = _mm256_loadu_ps(x + i + 16), v3 = _mm256_loadu_ps(x + i + 24);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
        a2 = _mm256_fmadd_ps(v2, v2, a2);
        a3 = _mm256_fmadd_ps(v3, v3, a3);
    }
    float lanes[8], q = 0.0f;
    _mm256_storeu_ps(lanes, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (int k = 0; k < 8; ++k)
        q += lanes[k];
    return q;
}
#endif

/* Sum of squares of x (copied to dst on the way when dst is not NULL). */
GF_CLONES static double squares(const float *x, float *dst, long n) {
#if GF_DISPATCH
    int stream = dst && __builtin_cpu_supports("avx");
    int fma = !dst && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    double q = 0.0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
        float bq = 0.0f;
        if (dst) {
            long i = i0;
#if GF_DISPATCH
            if (stream && ((uintptr_t)(dst + i) & 31) == 0) {
                long m = (i1 - i) & ~7L;
                bq += stream_copy_squares(x + i, dst + i, m);
                i += m;
            }
#endif
            for (; i < i1; ++i) {
                float v = x[i];
                dst[i] = v;
                bq += v * v;
            }
        } else {
            long i = i0;
#if GF_DISPATCH
            if (fma) {
                long m = (i1 - i) & ~31L;
                bq += fma_squares(x + i, m);
                i += m;
            }
#endif
            for (; i < i1; ++i)
                bq += x[i] * x[i];
        }
        q += bq;
    }
    return q;
}

/* The sum of squares alone, into out[0]: output gradients. */
void gradflow_squares_f32(const float *x, long n, double *out) {
    out[0] = squares(x, 0, n);
}

/* bfloat16 entries (CPU autocast's layer outputs and their gradients) are the upper 16 bits
   of float32 ones: widened WIDE at a time into a buffer that stays in cache, each run then
   reduced as float32 (its sums in double) and the runs' sums added. */
#define WIDE 8192

GF_CLONES static void widen_bf16(const uint16_t *h, float *f, long n) {
    for (long i = 0; i < n; ++i) {
        uint32_t bits = (uint32_t)h[i] << 16;
        memcpy(f + i, &bits, sizeof bits);
    }
}

void gradflow_reduce_bf16(const uint16_t *x, long n, double *out) {
    float wide[WIDE];
    double part[4];
    out[0] = out[1] = out[2] = out[3] = 0.0;
    for (long i0 = 0; i0 < n; i0 += WIDE) {
        long m = n - i0 < WIDE ? n - i0 : WIDE;
        widen_bf16(x + i0, wide, m);
        gradflow_reduce_f32(wide, m, part);
        for (int k = 0; k < 4; ++k)
            out[k] += part[k];
    }
}

void gradflow_squares_bf16(const uint16_t *x, long n, double *out) {
    float wide[WIDE];
    double q = 0.0;
    for (long i0 = 0; i0 < n; i0 += WIDE) {
        long m = n - i0 < WIDE ? n - i0 : WIDE;
        widen_bf16(x + i0, wide, m);
        q += squares(wide, 0, m);
    }
    out[0] = q;
}

/* d = x - y: sum d^2, sum |d|, sum g d and max |d| (NaN where d has a NaN) into
   out[0..3][t]; sum g d is 0 where g is NULL (no gradient). */
GF_CLONES static void delta(const float *x, const float *y, const float *g, long n,
                            double *const *out, long t) {
    /* Without a gradient the products are taken with x, in cache, and dropped: one loop
       that the compiler vectorises, no branch in it. */
    const float *gx = g ? g : x;
    double q = 0.0, s = 0.0, p = 0.0;
    /* max |d| on the bits of |d|: ordered like the floats (NaN aside, which q reports)
       and an integer maximum, which the compiler vectorises. */
    unsigned m = 0;
    for (long i0 = 0; i0 < n; i0 += BLOCK) {
        long i1 = i0 + BLOCK < n ? i0 + BLOCK : n;
        float bq = 0.0f, bs = 0.0f, bp = 0.0f;
        for (long i = i0; i < i1; ++i) {
            float d = x[i] - y[i], ad = fabsf(d);
            unsigned b;
            memcpy(&b, &ad, sizeof b);
            bq += d * d;
            bs += ad;
            bp += gx[i] * d;
            m = b > m ? b : m;
        }
        q += bq;
        s += bs;
        p += bp;
    }
    float fm;
    memcpy(&fm, &m, sizeof fm);
    out[0][t] = q;
    out[1][t] = s;
    out[2][t] = g ? p : 0.0;
    out[3][t] = isnan(q) ? NAN : (double)fm;
}

/* Tensor t of one parameter kernel: 0 sums of squares and non-finite counts of a[0]
   (NULL counts 0), 1 copy a[0] into a[1] with sums of squares, 2 the update statistics of
   d = a[0] - a[1] and its products with the gradient a[2] (NULL: none). */
static void param_op(int op, long t, const float *const *const *a, const long *n,
                     double *const *out) {
    const float *x = a[0][t];
    if (op == 0) {
        double q = x ? squares(x, 0, n[t]) : 0.0;
        long c = 0;
        if (!isfinite(q))
            for (long i = 0; i < n[t]; ++i)
                c += !isfinite(x[i]);
        out[0][t] = q;
        out[1][t] = (double)c;
    } else if (op == 1) {
        out[0][t] = squares(x, (float *)a[1][t], n[t]);
    } else {
        delta(x, a[1][t], a[2][t], n[t], out, t);
    }
}

struct span {
    int op;
    long t0, t1;
    const float *const *const *a;
    const long *n;
    double *const *out;
};

static void *run_span(void *p) {
    const struct span *s = p;
    for (long t = s->t0; t < s->t1; ++t)
        param_op(s->op, t, s->a, s->n, s->out);
#if GF_DISPATCH
    _mm_sfence(); /* the streamed copy is complete before the call returns */
#endif
    return 0;
}

/* Kernel op over all tensors, tensors [bounds[i], bounds[i+1]) on thread i of parts (this
   thread runs part 0; a part whose thread cannot start runs here too). */
void gradflow_params(int op, long parts, const long *bounds, const float *const *const *a,
                     const long *n, double *const *out) {
    struct span spans[64];
    pthread_t threads[64];
    int started[64];
    if (parts > 64)
        parts = 64;
    for (long i = 0; i < parts; ++i) {
        struct span s = {op, bounds[i], bounds[i + 1], a, n, out};
        spans[i] = s;
        started[i] = i > 0 && pthread_create(&threads[i], 0, run_span, &spans[i]) == 0;
    }
    run_span(&spans[0]);
    for (long i = 1; i < parts; ++i) {
        if (started[i])
            pthread_join(threads[i], 0);
        else
            run_span(&spans[i]);
    }
}

/* Which version of this file the library was built from (gradflow/kernels/_cbuild.py). */
#ifndef GRADFLOW_SOURCE_DIGEST
#define GRADFLOW_SOURCE_DIGEST ""
#endif
const char *gradflow_source_digest(void) { return GRADFLOW_SOURCE_DIGEST; }

#ifdef GRADFLOW_EXTENSION
/* setuptools builds this file as a Python extension module and, on some platforms,
   exports its init function: a stub. gradflow loads the library with ctypes; importing
   it as a module fails. */
void *PyInit__cpu(void) { return 0; }
#endif
