// CPU (OpenMP) sparse-delta kernels: SDDMM for the values' gradient, SpMM for the delta's share of
// y and dx, and the scatter of merge. The math and rounding are tunefast/reference/sparse.py's.
//
// Why token blocks: the SDDMM and SpMM gather columns of row-major activations (x[t, c_k] over t), a
// new cache line per element. Each block of TB tokens of the gathered operand (x; dy for dx) is first
// transposed into an fp32 buffer (features, TB), so that every entry becomes a contiguous TB-long dot
// product or axpy that the compiler vectorises. The other operand is per segment (one dy column per
// row of the delta; one output column per segment) and is read strided, once per segment and block.
//
// Why every thread transposes the whole block itself: it then shares nothing and never waits. With a
// shared buffer each block costs barriers, and on a loaded 2-core box (load average 5) a thread spins
// at each barrier while its partner is descheduled: 2 threads took 1.0 s of wall time and 0.51 s of
// CPU where 1 thread took 0.06 s (SDDMM, 4096^2 at 1 %, 2048 tokens). The duplicated transposition
// costs 6 ms per thread there, against 53 ms of dot products in all.
//
// TB keeps a thread's buffer within L2 (kSddmmBufferBytes, kSpmmBufferBytes below). These buffers are
// all the workspace the kernels take; the values' gradient itself is nnz floats.
#include <algorithm>
#include <cstring>
#include <vector>

#include "dtypes_cpu.h"
#include "sparse.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace tunefast {
namespace {

using namespace cpu_dtypes;  // Float32 / BFloat16 / Float16 conversions (csrc/dtypes_cpu.h)

// A team wakes in microseconds; below ~32k multiply-adds one thread is done sooner.
constexpr int64_t kParallelMinWork = int64_t(1) << 15;
// Per-thread transposed-block budgets (1 thread, 4096^2 layer, 2048 tokens, fp32). The SDDMM's is what
// its gradient costs beyond nnz floats: 256 KiB (16 tokens at K = 4096) keeps 2 threads' scratch plus
// the gradient under 1/50 of the dense fp32 gradient; it costs 61 vs 60 ms at 1 % density, 272 vs 222 ms
// at 5 %, against 512 KiB. The SpMMs keep 512 KiB: 229 vs 318 ms at 5 % (fewer passes over the indices).
// AVX2 + FMA code (-march=x86-64-v3) ran no faster: these loops wait on L2, not on arithmetic.
constexpr int64_t kSddmmBufferBytes = int64_t(256) << 10;
constexpr int64_t kSpmmBufferBytes = int64_t(512) << 10;

int64_t token_block(int64_t features, int64_t budget) {
    int64_t tb = 64;
    while (tb > 8 && features * tb * int64_t(sizeof(float)) > budget) tb /= 2;
    return tb;
}

// dst (cols, tb) fp32 = src (nt, cols)^T, zero past nt. Blocks of 16 columns: one cache line per row read.
template <typename D>
void transpose_block(const typename D::T* src, int64_t cols, int64_t nt, int64_t tb, float* dst) {
    constexpr int64_t kCols = 16;
    for (int64_t j0 = 0; j0 < cols; j0 += kCols) {
        const int64_t j1 = std::min(cols, j0 + kCols);
        for (int64_t t = 0; t < nt; ++t) {
            const typename D::T* row = src + t * cols;
            for (int64_t j = j0; j < j1; ++j) dst[j * tb + t] = D::load(row[j]);
        }
        for (int64_t j = j0; j < j1; ++j)
            for (int64_t t = nt; t < tb; ++t) dst[j * tb + t] = 0.0f;
    }
}

// The direct path: with fewer entries than the gathered operand has features (nnz < G), each entry's
// element is read straight from the token's row: one scalar load per entry and token, no transposition,
// and only segments with entries are visited (0.1 % of a 256 x 256 layer, 66 entries, 512 tokens: 39 us
// per SpMM call, against 72 us through token blocks). The path depends on nnz and the width only, so
// results do not depend on the thread count.

// Segments of [s0, s1) with entries: the direct path visits them once per token.
inline std::vector<int64_t> nonempty(const int64_t* ptr, int64_t s0, int64_t s1) {
    std::vector<int64_t> out;
    for (int64_t s = s0; s < s1; ++s)
        if (ptr[s] != ptr[s + 1]) out.push_back(s);
    return out;
}

inline float dot(const float* a, const float* b, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
}

// Segments [s0, s1) of thread i of n: cut where the entries reach i * nnz / n, so that rows of very
// different lengths (magnitude or gradient selection) still split the work evenly.
inline void thread_segments(const int64_t* ptr, int64_t S, int64_t nnz, int i, int n, int64_t& s0, int64_t& s1) {
    auto cut = [&](int j) -> int64_t {
        if (j <= 0) return 0;
        if (j >= n) return S;
        return std::lower_bound(ptr, ptr + S + 1, nnz * j / n) - ptr;
    };
    s0 = std::min(cut(i), S);
    s1 = std::max(s0, std::min(cut(i + 1), S));
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

inline int thread_count() {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

// One thread's share of the S segments delimited by seg (S + 1; the delta's rows for the SDDMM, out's
// columns for a SpMM), inside a parallel region: [s0, s1) from thread_segments, and the path it takes.
struct ThreadShare {
    int64_t s0 = 0, s1 = 0;
    bool direct = false;        // the direct path (nnz < G, above nonempty()) over `segs`
    bool blocked = false;       // the token-block path over [s0, s1)
    std::vector<int64_t> segs;  // the non-empty segments of [s0, s1), on the direct path only

    ThreadShare(const int64_t* seg, int64_t S, int64_t nnz, int64_t G) {
        thread_segments(seg, S, nnz, thread_id(), thread_count(), s0, s1);
        direct = s0 < s1 && nnz < G;
        blocked = s0 < s1 && !direct;
        if (direct) segs = nonempty(seg, s0, s1);
    }
};

// The token-block path's buffers, one set per thread: in (G, tb) fp32 takes blocks of tb tokens of
// src (M, G) transposed; scratch is tb floats.
template <typename D>
struct TokenBlocks {
    const typename D::T* src;
    int64_t M, G, tb;
    std::vector<float> in, scratch;

    TokenBlocks(const typename D::T* src_, int64_t M_, int64_t G_, int64_t tb_)
        : src(src_), M(M_), G(G_), tb(tb_), in(static_cast<size_t>(G_ * tb_)), scratch(static_cast<size_t>(tb_)) {}

    // Transposes tokens t0 .. t0 + nt - 1 into `in` (zero past nt); returns nt.
    int64_t load(int64_t t0) {
        const int64_t nt = std::min(tb, M - t0);
        transpose_block<D>(src + t0 * G, G, nt, tb, in.data());
        return nt;
    }
};

template <typename D>
void sddmm_impl(const typename D::T* dy, const typename D::T* x, const int64_t* idx, const int64_t* ptr,
                float* out, int64_t M, int64_t N, int64_t K, int64_t nnz) {
    std::fill(out, out + nnz, 0.0f);
    if (M == 0 || nnz == 0) return;
    const int64_t tb = token_block(K, kSddmmBufferBytes);
#pragma omp parallel if (M * nnz >= kParallelMinWork)
    {
        const ThreadShare my(ptr, N, nnz, K);  // segments: the delta's rows; gathered: x (M, K)
        if (my.direct) {
            for (int64_t t = 0; t < M; ++t) {
                const typename D::T* xrow = x + t * K;
                for (const int64_t r : my.segs) {
                    const float a = D::load(dy[t * N + r]);
                    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) out[k] += a * D::load(xrow[idx[k] - r * K]);
                }
            }
        } else if (my.blocked) {
            TokenBlocks<D> xT(x, M, K, tb);
            float* a = xT.scratch.data();
            for (int64_t t0 = 0; t0 < M; t0 += tb) {
                const int64_t nt = xT.load(t0);
                // Rows, not entries: row r's dy column is gathered once for all its entries, and
                // c = idx - r * K needs no division.
                for (int64_t r = my.s0; r < my.s1; ++r) {
                    if (ptr[r] == ptr[r + 1]) continue;
                    for (int64_t t = 0; t < nt; ++t) a[t] = D::load(dy[(t0 + t) * N + r]);
                    for (int64_t t = nt; t < tb; ++t) a[t] = 0.0f;
                    for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k)
                        out[k] += dot(a, xT.in.data() + (idx[k] - r * K) * tb, tb);
                }
            }
        }
    }
}

template <typename D, typename V>
void spmm_impl(typename D::T* out, const typename D::T* inp, const int64_t* seg, const int64_t* idx,
               const int32_t* t_rows, const typename V::T* vals, const int32_t* perm, int64_t M, int64_t S,
               int64_t G, int64_t nnz, bool transposed) {
    if (M == 0 || S == 0 || nnz == 0) return;
    const int64_t tb = token_block(G, kSpmmBufferBytes);
#pragma omp parallel if (M * nnz >= kParallelMinWork)
    {
        const ThreadShare my(seg, S, nnz, G);  // segments: out's columns; gathered: inp (M, G)
        if (my.direct) {
            for (int64_t t = 0; t < M; ++t) {
                const typename D::T* row = inp + t * G;
                for (const int64_t s : my.segs) {
                    const int64_t e0 = seg[s], e1 = seg[s + 1];
                    float sum = 0.0f;
                    for (int64_t e = e0; e < e1; ++e) {
                        const int64_t g = transposed ? int64_t(t_rows[e]) : idx[e] - s * G;
                        sum += V::load(vals[transposed ? int64_t(perm[e]) : e]) * D::load(row[g]);
                    }
                    typename D::T* o = out + t * S + s;
                    *o = D::store(D::load(*o) + sum);
                }
            }
        } else if (my.blocked) {
            TokenBlocks<D> inT(inp, M, G, tb);
            float* a = inT.scratch.data();
            for (int64_t t0 = 0; t0 < M; t0 += tb) {
                const int64_t nt = inT.load(t0);
                for (int64_t s = my.s0; s < my.s1; ++s) {
                    const int64_t e0 = seg[s], e1 = seg[s + 1];
                    if (e0 == e1) continue;  // no entries: out keeps its value
                    std::fill(a, a + tb, 0.0f);
                    for (int64_t e = e0; e < e1; ++e) {
                        const int64_t g = transposed ? int64_t(t_rows[e]) : idx[e] - s * G;
                        const float v = V::load(vals[transposed ? int64_t(perm[e]) : e]);
                        const float* xr = inT.in.data() + g * tb;
#pragma omp simd
                        for (int64_t t = 0; t < tb; ++t) a[t] += v * xr[t];
                    }
                    for (int64_t t = 0; t < nt; ++t) {
                        typename D::T* o = out + (t0 + t) * S + s;
                        *o = D::store(D::load(*o) + a[t]);
                    }
                }
            }
        }
    }
}

template <typename W, typename V>
void scatter_impl(typename W::T* w, int64_t sr, int64_t sc, const int64_t* idx, const typename V::T* vals,
                  typename W::T* saved, int64_t K, int64_t nnz) {
#pragma omp parallel for schedule(static) if (nnz >= kParallelMinWork)
    for (int64_t k = 0; k < nnz; ++k) {
        const int64_t r = idx[k] / K, c = idx[k] - r * K;
        typename W::T* p = w + r * sr + c * sc;
        saved[k] = *p;
        *p = W::store(W::load(*p) + V::load(vals[k]));
    }
}

}  // namespace

namespace cpu {

void sparse_sddmm(uintptr_t dy, uintptr_t x, uintptr_t indices, uintptr_t row_ptr, uintptr_t out,
                  int64_t M, int64_t N, int64_t K, int64_t nnz, int dtype_code) {
    const char* fn = "sparse_sddmm";
    const DType dtype = check_sddmm(fn, dy, x, indices, out, M, N, K, nnz, dtype_code);
    check_nonnull(fn, row_ptr, "row_ptr", N > 0);
    dispatch(dtype, [&](auto d) {
        using D = decltype(d);
        sddmm_impl<D>(reinterpret_cast<const typename D::T*>(dy), reinterpret_cast<const typename D::T*>(x),
                      reinterpret_cast<const int64_t*>(indices), reinterpret_cast<const int64_t*>(row_ptr),
                      reinterpret_cast<float*>(out), M, N, K, nnz);
    });
}

void sparse_spmm(uintptr_t out, uintptr_t inp, uintptr_t seg_ptr, uintptr_t gather, uintptr_t values,
                 uintptr_t perm, int64_t M, int64_t S, int64_t G, int64_t nnz, bool transposed,
                 int io_dtype, int value_dtype) {
    const char* fn = "sparse_spmm";
    check_sizes(fn, M, "M", S, "S", G, "G");
    check_arg(nnz >= 0, fn, "nnz must be >= 0");
    const bool work = M > 0 && S > 0 && nnz > 0;
    check_nonnull(fn, out, "out", work);
    check_nonnull(fn, inp, "inp", work);
    check_nonnull(fn, seg_ptr, "seg_ptr", work);
    check_nonnull(fn, gather, "gather", work);
    check_nonnull(fn, values, "values", work);
    check_nonnull(fn, perm, "perm", work && transposed);
    const DType io = check_dtype(fn, io_dtype), vd = check_dtype(fn, value_dtype);
    dispatch(io, vd, [&](auto d, auto v) {
        using D = decltype(d);
        using V = decltype(v);
        spmm_impl<D, V>(reinterpret_cast<typename D::T*>(out), reinterpret_cast<const typename D::T*>(inp),
                        reinterpret_cast<const int64_t*>(seg_ptr),
                        transposed ? nullptr : reinterpret_cast<const int64_t*>(gather),
                        transposed ? reinterpret_cast<const int32_t*>(gather) : nullptr,
                        reinterpret_cast<const typename V::T*>(values), reinterpret_cast<const int32_t*>(perm), M,
                        S, G, nnz, transposed);
    });
}

void sparse_scatter_add(uintptr_t weight, int64_t stride_r, int64_t stride_c, uintptr_t indices,
                        uintptr_t values, uintptr_t saved, int64_t N, int64_t K, int64_t nnz,
                        int weight_dtype, int value_dtype) {
    const std::pair<DType, DType> wv =
        check_scatter_add(weight, indices, values, saved, N, K, nnz, weight_dtype, value_dtype);
    dispatch(wv.first, wv.second, [&](auto w, auto v) {
        using W = decltype(w);
        using V = decltype(v);
        scatter_impl<W, V>(reinterpret_cast<typename W::T*>(weight), stride_r, stride_c,
                           reinterpret_cast<const int64_t*>(indices), reinterpret_cast<const typename V::T*>(values),
                           reinterpret_cast<typename W::T*>(saved), K, nnz);
    });
}

}  // namespace cpu
}  // namespace tunefast
