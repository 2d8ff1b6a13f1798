// CUDA sparse-delta kernels: the values' SDDMM and the merge scatter (math: tunefast/reference/sparse.py).
//
// Caution: compiled in CI, never run on a GPU yet.
//   * SDDMM: one thread per entry, consecutive entries in a warp, looping over its token range; the
//     token range is split over gridDim.y so that small deltas (0.1 % of a 4096^2 layer is 16.8k
//     entries, 524 warps) still fill the device. Each split writes its own row of fp32 partials and
//     the caller sums them: deterministic, no atomics. The x[t, c_k] loads of a warp are 32 columns of
//     one row, one sector each; that gather is the SDDMM's cost (2 * M * nnz loads) at any density.
//   * scatter: one thread per entry; entries are unique, so no two threads touch one weight element.
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "dtypes_cuda.cuh"
#include "launch_cuda.cuh"
#include "sparse.h"

namespace tunefast {
namespace {

using cuda_dtypes::dispatch;
using cuda_dtypes::Io;  // csrc/dtypes_cuda.cuh
using namespace cuda_launch;  // kThreads, blocks_for, check_launch (csrc/launch_cuda.cuh)

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

}  // namespace

namespace cuda {

void sparse_sddmm(uintptr_t dy, uintptr_t x, uintptr_t indices, uintptr_t out, int64_t M, int64_t N,
                  int64_t K, int64_t nnz, int64_t stride_dym, int64_t stride_dyn, int64_t stride_xm,
                  int64_t stride_xk, int64_t t_per_split, int64_t splits, int dtype_code,
                  uintptr_t stream) {
    const char* fn = "sparse_sddmm";
    const DType dtype = check_sddmm(fn, dy, x, indices, out, M, N, K, nnz, dtype_code);
    check_arg(splits >= 1 && splits <= 65535, fn, "splits must be in [1, 65535], got " + std::to_string(splits));
    check_arg(t_per_split >= 1 && t_per_split * splits >= M, fn, "splits * t_per_split must cover M tokens");
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
    const std::pair<DType, DType> wv =
        check_scatter_add(weight, indices, values, saved, N, K, nnz, weight_dtype, value_dtype);
    if (nnz == 0) return;
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    dispatch(wv.first, wv.second, [&](auto wtag, auto vtag) {
        using W = decltype(wtag);
        using V = decltype(vtag);
        scatter_kernel<W, V><<<blocks_for(uint64_t(nnz)), kThreads, 0, st>>>(reinterpret_cast<W*>(weight),
            stride_r, stride_c, reinterpret_cast<const int64_t*>(indices), reinterpret_cast<const V*>(values),
            reinterpret_cast<W*>(saved), K, nnz);
    });
    check_launch("sparse_scatter_add");
}

}  // namespace cuda
}  // namespace tunefast
