// Counter-based dropout kernels on raw pointers (see tunefast/reference/dropout.py for the definition).
//
// Tensors cross the Python boundary as integer data pointers plus sizes, so neither module links
// libtorch: one build serves every torch version, and building never needs torch installed.
// All matrices are row-major (rows, cols) and contiguous; element (i, j) draws at counter offset
// (row_start + i) * cols + j: row_start says which rows of a larger matrix these are.
#pragma once

#include <cstdint>

#include "checks.h"  // DType, check_arg, check_dtype

namespace tunefast {

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

// dropout_apply / dropout_add after their checks: fn, the entry point's name (for later errors), n = rows *
// cols elements whose draws start at counter offset first_offset = row_start * cols, and the scale rounded
// to fp32 (as torch rounds a Python scalar).
struct DropoutProblem {
    const char* fn;
    DType dtype;
    int64_t n;
    uint64_t first_offset;
    float scale;
};

// The checks of dropout_apply(a = in, b = out) and dropout_add(a = dst, b = src) on either back end, in
// the order the arguments come: sizes, a, b, dtype.
inline DropoutProblem check_dropout(const char* fn, uintptr_t a, const char* a_name, uintptr_t b,
                                    const char* b_name, int64_t rows, int64_t cols, int dtype_code,
                                    uint64_t threshold, double scale, int64_t row_start) {
    check_problem(fn, rows, cols, row_start, threshold);
    check_ptr(fn, a, a_name, rows, cols);
    check_ptr(fn, b, b_name, rows, cols);
    const DType dtype = check_dtype(fn, dtype_code);
    return {fn, dtype, rows * cols, uint64_t(row_start) * uint64_t(cols), static_cast<float>(scale)};
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
