// CUDA sparse-delta kernels: the values' SDDMM and the merge scatter (math: tunefast/reference/sparse.py).
//
// Caution: compiled in CI, never run on a GPU yet.
//   * SDDMM: one thread per entry, consecutive entries in a warp, looping over its token range; the
//     token range is split over gridDim.y so that small deltas (0.1 % of a 4096^2 layer is 16.8k
//     entries, 524 warps) still fill the device. Each split writes its own row of fp32 partials and
//     the caller sums them: deterministic, no atomics. The x[t, c_k] loads of a warp are 32 columns of
//     one row, one sector each; that gather is the SDDMM's cost (2 * M * nnz loads) at any density.
//   * scatter: one thread per entry; entries are unique, so no two threads touch one weight element.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <stdexcept>
#include <string>

#include "dtypes_cuda.cuh"
#include "sparse.h"

namespace tunefast {
namespace {

using cuda_dtypes::Io;  // csrc/dtypes_cuda.cuh

template <typename T>
__global__ void sddmm_kernel(const T* __restrict__ dy, const T* __restrict__ x, const int64_t* __restrict__ idx,
                             float* __restrict__ out, int64_t M, int64_t K, int64_t nnz, int64_t sdm,
                             int64_t sdn, int64_t sxm, int64_t sxk, int64_t t_per_split) {
    const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (k >= nnz) return;
    const int64_t split = blockIdx.y;
    const int64_t t0 = split * t_per_split, t1 = t0 + t_per_split < M ? t0 + t_per_split : M;
    const int64_t flat = idx[k];
    const int64_t r = flat / K, c = flat - r * K;
    const T* a = dy + r * sdn;
    const T* b = x + c * sxk;
    // Four independent accumulators: four loads in flight per thread.
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) {
        s0 = fmaf(Io<T>::load(a[t * sdm]), Io<T>::load(b[t * sxm]), s0);
        s1 = fmaf(Io<T>::load(a[(t + 1) * sdm]), Io<T>::load(b[(t + 1) * sxm]), s1);
        s2 = fmaf(Io<T>::load(a[(t + 2) * sdm]), Io<T>::load(b[(t + 2) * sxm]), s2);
        s3 = fmaf(Io<T>::load(a[(t + 3) * sdm]), Io<T>::load(b[(t + 3) * sxm]), s3);
    }
    for (; t < t1; ++t) s0 = fmaf(Io<T>::load(a[t * sdm]), Io<T>::load(b[t * sxm]), s0);
    out[split * nnz + k] = (s0 + s1) + (s2 + s3);
}

template <typename W, typename V>
__global__ void scatter_kernel(W* w, int64_t sr, int64_t sc, const int64_t* __restrict__ idx,
                               const V* __restrict__ vals, W* __restrict__ saved, int64_t K, int64_t nnz) {
    for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < nnz;
         k += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = idx[k] / K, c = idx[k] - r * K;
        W* p = w + r * sr + c * sc;
        const W old = *p;
        saved[k] = old;
        *p = Io<W>::store(__fadd_rn(Io<W>::load(old), Io<V>::load(vals[k])));  // one rounding, as torch
    }
}

constexpr unsigned kThreads = 256;

void check_launch(const char* fn) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(fn) + ": CUDA kernel launch failed: " + cudaGetErrorString(err));
}

template <typename Fn>
void dispatch(DType d, Fn&& fn) {
    switch (d) {
        case DType::Float32: fn(float{}); break;
        case DType::Float16: fn(__half{}); break;
        case DType::BFloat16: fn(__nv_bfloat16{}); break;
    }
}

}  // namespace

namespace cuda {

void sparse_sddmm(uintptr_t dy, uintptr_t x, uintptr_t indices, uintptr_t out, int64_t M, int64_t N,
                  int64_t K, int64_t nnz, int64_t stride_dym, int64_t stride_dyn, int64_t stride_xm,
                  int64_t stride_xk, int64_t t_per_split, int64_t splits, int dtype_code,
                  uintptr_t stream) {
    const char* fn = "sparse_sddmm";
    check_sizes(fn, M, "M", N, "N", K, "K");
    check_arg(nnz >= 0, fn, "nnz must be >= 0");
    check_arg(nnz == 0 || (N > 0 && K > 0), fn, "entries need N > 0 and K > 0");
    check_arg(splits >= 1 && splits <= 65535, fn, "splits must be in [1, 65535], got " + std::to_string(splits));
    check_arg(t_per_split >= 1 && t_per_split * splits >= M, fn, "splits * t_per_split must cover M tokens");
    check_nonnull(fn, dy, "dy", M > 0 && nnz > 0);
    check_nonnull(fn, x, "x", M > 0 && nnz > 0);
    check_nonnull(fn, indices, "indices", nnz > 0);
    check_nonnull(fn, out, "out", nnz > 0);
    const DType dtype = check_dtype(fn, dtype_code);
    if (nnz == 0) return;
    const dim3 grid(unsigned((nnz + kThreads - 1) / kThreads), unsigned(splits));
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    dispatch(dtype, [&](auto tag) {
        using T = decltype(tag);
        sddmm_kernel<T><<<grid, kThreads, 0, st>>>(reinterpret_cast<const T*>(dy), reinterpret_cast<const T*>(x),
            reinterpret_cast<const int64_t*>(indices), reinterpret_cast<float*>(out), M, K, nnz, stride_dym,
            stride_dyn, stride_xm, stride_xk, t_per_split);
    });
    check_launch(fn);
}

void sparse_scatter_add(uintptr_t weight, int64_t stride_r, int64_t stride_c, uintptr_t indices,
                        uintptr_t values, uintptr_t saved, int64_t N, int64_t K, int64_t nnz,
                        int weight_dtype, int value_dtype, uintptr_t stream) {
    const char* fn = "sparse_scatter_add";
    check_sizes(fn, N, "N", K, "K", nnz, "nnz");
    check_arg(nnz == 0 || (N > 0 && K > 0), fn, "entries need N > 0 and K > 0");
    check_nonnull(fn, weight, "weight", nnz > 0);
    check_nonnull(fn, indices, "indices", nnz > 0);
    check_nonnull(fn, values, "values", nnz > 0);
    check_nonnull(fn, saved, "saved", nnz > 0);
    const DType wd = check_dtype(fn, weight_dtype), vd = check_dtype(fn, value_dtype);
    if (nnz == 0) return;
    const unsigned blocks = unsigned(std::min<int64_t>((nnz + kThreads - 1) / kThreads, 65536));
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    dispatch(wd, [&](auto wtag) {
        dispatch(vd, [&](auto vtag) {
            using W = decltype(wtag);
            using V = decltype(vtag);
            scatter_kernel<W, V><<<blocks, kThreads, 0, st>>>(reinterpret_cast<W*>(weight), stride_r, stride_c,
                reinterpret_cast<const int64_t*>(indices), reinterpret_cast<const V*>(values),
                reinterpret_cast<W*>(saved), K, nnz);
        });
    });
    check_launch(fn);
}

}  // namespace cuda
}  // namespace tunefast
