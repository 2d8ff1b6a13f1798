// CUDA dropout kernels: the same draws and the same rounding as csrc/dropout_cpu.cpp.
//
// __fmul_rn/__fadd_rn are never fused into an FMA by nvcc, so every op rounds as PyTorch's
// `x * mask * scale` and `dst + that` do, and the GPU result equals the CPU one bit for bit.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "dropout.h"
#include "dtypes_cuda.cuh"
#include "launch_cuda.cuh"
#include "philox.h"

namespace tunefast {
namespace {

using cuda_dtypes::Io;  // csrc/dtypes_cuda.cuh
using namespace cuda_launch;  // kThreads, blocks_for, check_launch (csrc/launch_cuda.cuh)

__global__ void keep_mask_kernel(uint8_t* out, uint64_t n, uint64_t first_offset, uint64_t seed,
                                 uint64_t threshold) {
    for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += uint64_t(gridDim.x) * blockDim.x)
        out[i] = philox_keep(seed, first_offset + i, threshold);
}

// out = dropout(src) (Add = false: dropout_apply, src is its `in`) or out += dropout(src) (Add = true:
// dropout_add, out is its `dst`), for n elements whose draws start at counter offset first_offset.
template <typename T, bool Add>
__global__ void dropout_kernel(T* out, const T* __restrict__ src, uint64_t n, uint64_t first_offset,
                               uint64_t seed, uint64_t threshold, float scale) {
    for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += uint64_t(gridDim.x) * blockDim.x) {
        const float keep = philox_keep(seed, first_offset + i, threshold) ? 1.0f : 0.0f;
        const T dropped = Io<T>::store(__fmul_rn(__fmul_rn(Io<T>::load(src[i]), keep), scale));
        if constexpr (Add) {
            out[i] = Io<T>::store(__fadd_rn(Io<T>::load(out[i]), Io<T>::load(dropped)));
        } else {
            out[i] = dropped;
        }
    }
}

// One launch of dropout_kernel<T, Add> for the checked problem p (none when it is empty).
template <bool Add>
void launch_dropout(uintptr_t out, uintptr_t src, const DropoutProblem& p, uint64_t seed, uint64_t threshold,
                    uintptr_t stream) {
    if (p.n == 0) return;
    const uint64_t n = uint64_t(p.n);
    cuda_dtypes::dispatch(p.dtype, [&](auto tag) {
        using T = decltype(tag);
        dropout_kernel<T, Add><<<blocks_for(n), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
            reinterpret_cast<T*>(out), reinterpret_cast<const T*>(src), n, p.first_offset, seed, threshold,
            p.scale);
    });
    check_launch(p.fn);
}

}  // namespace

namespace cuda {

void keep_mask(uintptr_t out, int64_t rows, int64_t cols, int64_t row_start, uint64_t seed,
               uint64_t threshold, uintptr_t stream) {
    check_problem("keep_mask", rows, cols, row_start, threshold);
    check_ptr("keep_mask", out, "out", rows, cols);
    const uint64_t n = uint64_t(rows) * uint64_t(cols);
    if (n == 0) return;
    keep_mask_kernel<<<blocks_for(n), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<uint8_t*>(out), n, uint64_t(row_start) * uint64_t(cols), seed, threshold);
    check_launch("keep_mask");
}

void dropout_apply(uintptr_t in, uintptr_t out, int64_t rows, int64_t cols, int dtype_code, uint64_t seed,
                   uint64_t threshold, double scale, uintptr_t stream, int64_t row_start) {
    const DropoutProblem p =
        check_dropout("dropout_apply", in, "in", out, "out", rows, cols, dtype_code, threshold, scale, row_start);
    launch_dropout<false>(out, in, p, seed, threshold, stream);
}

void dropout_add(uintptr_t dst, uintptr_t src, int64_t rows, int64_t cols, int dtype_code, uint64_t seed,
                 uint64_t threshold, double scale, uintptr_t stream, int64_t row_start) {
    const DropoutProblem p =
        check_dropout("dropout_add", dst, "dst", src, "src", rows, cols, dtype_code, threshold, scale, row_start);
    launch_dropout<true>(dst, src, p, seed, threshold, stream);
}

int device_count() {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear it, so that it does not surface from a later launch check
        throw std::runtime_error(std::string("CUDA: ") + cudaGetErrorString(err));
    }
    return count;
}

int runtime_version() { return CUDART_VERSION; }

}  // namespace cuda
}  // namespace tunefast
