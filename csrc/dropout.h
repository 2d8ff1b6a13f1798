// Counter-based dropout kernels on raw pointers (see tunefast/reference/dropout.py for the definition).
//
// Tensors cross the Python boundary as integer data pointers plus sizes, so neither module links
// libtorch: one build serves every torch version, and building never needs torch installed.
// All matrices are row-major (rows, cols) and contiguous; element (i, j) draws at counter offset
// (row_start + i) * cols + j: row_start says which rows of a larger matrix these are.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace tunefast {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

// Checks shared by both back ends; std::invalid_argument reaches Python as ValueError.
inline void check_arg(bool ok, const char* fn, const std::string& what) {
    if (!ok) throw std::invalid_argument(std::string(fn) + ": " + what);
}

inline void check_problem(const char* fn, int64_t rows, int64_t cols, int64_t row_start,
                          uint64_t threshold) {
    check_arg(rows >= 0, fn, "rows must be >= 0, got " + std::to_string(rows));
    check_arg(cols >= 0, fn, "cols must be >= 0, got " + std::to_string(cols));
    check_arg(row_start >= 0, fn, "row_start must be >= 0, got " + std::to_string(row_start));
    // Offsets are int64 in the PyTorch reference, and rows * cols is an int64 here.
    const uint64_t int64_max = (uint64_t(1) << 63) - 1;
    check_arg(cols == 0 || uint64_t(row_start) + uint64_t(rows) <= int64_max / uint64_t(cols), fn,
              "(row_start + rows) * cols must be < 2^63");
    check_arg(threshold <= (uint64_t(1) << 32), fn,
              "threshold must be <= 2^32, got " + std::to_string(threshold));
}

inline void check_ptr(const char* fn, uintptr_t ptr, const char* name, int64_t rows, int64_t cols) {
    check_arg(ptr != 0 || rows == 0 || cols == 0, fn,
              std::string(name) + " is a null pointer for a non-empty matrix");
}

inline DType check_dtype(const char* fn, int code) {
    check_arg(code >= 0 && code <= 2, fn,
              "dtype_code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(code));
    return static_cast<DType>(code);
}

namespace cpu {
void keep_mask(uintptr_t out, int64_t rows, int64_t cols, int64_t row_start, uint64_t seed,
               uint64_t threshold);
void dropout_apply(uintptr_t in, uintptr_t out, int64_t rows, int64_t cols, int dtype_code,
                   uint64_t seed, uint64_t threshold, double scale, int64_t row_start);
void dropout_add(uintptr_t dst, uintptr_t src, int64_t rows, int64_t cols, int dtype_code,
                 uint64_t seed, uint64_t threshold, double scale, int64_t row_start);
}  // namespace cpu

namespace cuda {
// `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
void keep_mask(uintptr_t out, int64_t rows, int64_t cols, int64_t row_start, uint64_t seed,
               uint64_t threshold, uintptr_t stream);
void dropout_apply(uintptr_t in, uintptr_t out, int64_t rows, int64_t cols, int dtype_code,
                   uint64_t seed, uint64_t threshold, double scale, uintptr_t stream,
                   int64_t row_start);
void dropout_add(uintptr_t dst, uintptr_t src, int64_t rows, int64_t cols, int dtype_code,
                 uint64_t seed, uint64_t threshold, double scale, uintptr_t stream,
                 int64_t row_start);
int device_count();  // throws std::runtime_error naming the CUDA error (e.g. no driver)
int runtime_version();  // CUDART_VERSION this module was compiled against
}  // namespace cuda

}  // namespace tunefast
