// CUDA dropout kernels: the same draws and the same rounding as csrc/dropout_cpu.cpp.
//
// __fmul_rn/__fadd_rn are never fused into an FMA by nvcc, so every op rounds as PyTorch's
// `x * mask * scale` and `dst + that` do, and the GPU result equals the CPU one bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "dtypes_cuda.cuh"
#include "dropout.h"
#include "philox.h"

namespace tunefast {
namespace {

using cuda_dtypes::Io;  // csrc/dtypes_cuda.cuh

__global__ void keep_mask_kernel(uint8_t* out, uint64_t n, uint64_t first_offset, uint64_t seed,
                                 uint64_t threshold) {
    for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += uint64_t(gridDim.x) * blockDim.x)
        out[i] = philox_keep(seed, first_offset + i, threshold);
}

template <typename T>
__global__ void apply_kernel(const T* __restrict__ in, T* out, uint64_t n, uint64_t first_offset,
                             uint64_t seed, uint64_t threshold, float scale) {
    for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += uint64_t(gridDim.x) * blockDim.x) {
        const float keep = philox_keep(seed, first_offset + i, threshold) ? 1.0f : 0.0f;
        out[i] = Io<T>::store(__fmul_rn(__fmul_rn(Io<T>::load(in[i]), keep), scale));
    }
}

template <typename T>
__global__ void add_kernel(T* dst, const T* __restrict__ src, uint64_t n, uint64_t first_offset,
                           uint64_t seed, uint64_t threshold, float scale) {
    for (uint64_t i = uint64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += uint64_t(gridDim.x) * blockDim.x) {
        const float keep = philox_keep(seed, first_offset + i, threshold) ? 1.0f : 0.0f;
        const T dropped = Io<T>::store(__fmul_rn(__fmul_rn(Io<T>::load(src[i]), keep), scale));
        dst[i] = Io<T>::store(__fadd_rn(Io<T>::load(dst[i]), Io<T>::load(dropped)));
    }
}

constexpr unsigned kThreads = 256;
// 65536 blocks of 256 threads fill any current GPU many times over (an H200 holds ~1,100 such
// blocks at once); larger inputs are covered by the grid-stride loops.
constexpr uint64_t kMaxBlocks = 65536;

unsigned blocks_for(uint64_t n) {
    return static_cast<unsigned>(std::min<uint64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

void check_launch(const char* fn) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(fn) + ": CUDA kernel launch failed: " +
                                 cudaGetErrorString(err));
}

template <typename T>
void launch_apply(uintptr_t in, uintptr_t out, uint64_t n, uint64_t first_offset, uint64_t seed,
                  uint64_t threshold, float scale, cudaStream_t stream) {
    apply_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(reinterpret_cast<const T*>(in),
        reinterpret_cast<T*>(out), n, first_offset, seed, threshold, scale);
}

template <typename T>
void launch_add(uintptr_t dst, uintptr_t src, uint64_t n, uint64_t first_offset, uint64_t seed,
                uint64_t threshold, float scale, cudaStream_t stream) {
    add_kernel<T><<<blocks_for(n), kThreads, 0, stream>>>(reinterpret_cast<T*>(dst),
        reinterpret_cast<const T*>(src), n, first_offset, seed, threshold, scale);
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

void dropout_apply(uintptr_t in, uintptr_t out, int64_t rows, int64_t cols, int dtype_code,
                   uint64_t seed, uint64_t threshold, double scale, uintptr_t stream,
                   int64_t row_start) {
    check_problem("dropout_apply", rows, cols, row_start, threshold);
    check_ptr("dropout_apply", in, "in", rows, cols);
    check_ptr("dropout_apply", out, "out", rows, cols);
    const DType dtype = check_dtype("dropout_apply", dtype_code);
    const uint64_t n = uint64_t(rows) * uint64_t(cols);
    if (n == 0) return;
    const float s = static_cast<float>(scale);  // torch rounds a Python scalar to fp32 too
    const uint64_t first = uint64_t(row_start) * uint64_t(cols);
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case DType::Float32: launch_apply<float>(in, out, n, first, seed, threshold, s, st); break;
        case DType::Float16: launch_apply<__half>(in, out, n, first, seed, threshold, s, st); break;
        case DType::BFloat16: launch_apply<__nv_bfloat16>(in, out, n, first, seed, threshold, s, st); break;
    }
    check_launch("dropout_apply");
}

void dropout_add(uintptr_t dst, uintptr_t src, int64_t rows, int64_t cols, int dtype_code,
                 uint64_t seed, uint64_t threshold, double scale, uintptr_t stream,
                 int64_t row_start) {
    check_problem("dropout_add", rows, cols, row_start, threshold);
    check_ptr("dropout_add", dst, "dst", rows, cols);
    check_ptr("dropout_add", src, "src", rows, cols);
    const DType dtype = check_dtype("dropout_add", dtype_code);
    const uint64_t n = uint64_t(rows) * uint64_t(cols);
    if (n == 0) return;
    const float s = static_cast<float>(scale);
    const uint64_t first = uint64_t(row_start) * uint64_t(cols);
    const auto st = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case DType::Float32: launch_add<float>(dst, src, n, first, seed, threshold, s, st); break;
        case DType::Float16: launch_add<__half>(dst, src, n, first, seed, threshold, s, st); break;
        case DType::BFloat16: launch_add<__nv_bfloat16>(dst, src, n, first, seed, threshold, s, st); break;
    }
    check_launch("dropout_add");
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
