// Scalar float <-> storage conversions for the CUDA kernels (round to nearest even, as PyTorch), shared
// by dropout_cuda.cu and sparse_cuda.cu. The CPU twin is csrc/dtypes_cpu.h.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "checks.h"  // DTypeSwitch

namespace tunefast {
namespace cuda_dtypes {

template <typename T> struct Io;
template <> struct Io<float> {
    static __device__ float load(float v) { return v; }
    static __device__ float store(float v) { return v; }
};
template <> struct Io<__half> {
    static __device__ float load(__half v) { return __half2float(v); }
    static __device__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Io<__nv_bfloat16> {
    static __device__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
    static __device__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// dispatch(d, fn) / dispatch(a, b, fn), host side: fn gets a value of each dtype code's element type
// (csrc/checks.h).
inline constexpr DTypeSwitch<float, __half, __nv_bfloat16> dispatch{};

}  // namespace cuda_dtypes
}  // namespace tunefast
