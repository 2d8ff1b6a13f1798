// Launch geometry and the launch-error check shared by dropout_cuda.cu and sparse_cuda.cu (host side).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace tunefast {
namespace cuda_launch {

constexpr unsigned kThreads = 256;
// 65536 blocks of 256 threads fill any current GPU many times over (an H200 holds ~1,100 such
// blocks at once); larger inputs are covered by the kernels' grid-stride loops.
constexpr uint64_t kMaxBlocks = 65536;

// Blocks of kThreads for n elements of a grid-stride kernel.
inline unsigned blocks_for(uint64_t n) {
    return static_cast<unsigned>(std::min<uint64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

// Throws std::runtime_error (RuntimeError in Python) naming fn if the last launch failed.
inline void check_launch(const char* fn) {
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess)
        throw std::runtime_error(std::string(fn) + ": CUDA kernel launch failed: " + cudaGetErrorString(err));
}

}  // namespace cuda_launch
}  // namespace tunefast
