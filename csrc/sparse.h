// Sparse weight-delta kernels on raw pointers (the math is tunefast/reference/sparse.py).
//
// A delta of an (N, K) weight holds nnz entries at strictly increasing flat indices r * K + c (int64),
// with row_ptr (N + 1, int64) delimiting each row's entries: CSR. Its transpose is the same entries by
// column: col_ptr (K + 1, int64), t_rows (nnz, int32: the entries' rows in column order) and t_perm
// (nnz, int32: their positions in the CSR order). Activations are contiguous row-major (M, features).
// Every sum is fp32. The kernels trust the structure (tunefast/ops/sparse.py validates it once).
//
// Dtype codes as in checks.h: 0 float32, 1 float16, 2 bfloat16.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "checks.h"  // DType, check_arg, check_dtype

namespace tunefast {

inline void check_sizes(const char* fn, int64_t a, const char* na, int64_t b, const char* nb, int64_t c,
                        const char* nc) {
    check_arg(a >= 0, fn, std::string(na) + " must be >= 0, got " + std::to_string(a));
    check_arg(b >= 0, fn, std::string(nb) + " must be >= 0, got " + std::to_string(b));
    check_arg(c >= 0, fn, std::string(nc) + " must be >= 0, got " + std::to_string(c));
}

inline void check_nonnull(const char* fn, uintptr_t ptr, const char* name, bool needed) {
    check_arg(ptr != 0 || !needed, fn, std::string(name) + " is a null pointer for a non-empty operand");
}

// The checks both back ends' sparse_sddmm make (each adds its own: row_ptr on the CPU, the token splits
// on CUDA); returns dy's and x's dtype.
inline DType check_sddmm(const char* fn, uintptr_t dy, uintptr_t x, uintptr_t indices, uintptr_t out, int64_t M,
                         int64_t N, int64_t K, int64_t nnz, int dtype_code) {
    check_sizes(fn, M, "M", N, "N", K, "K");
    check_arg(nnz >= 0, fn, "nnz must be >= 0");
    check_arg(nnz == 0 || (N > 0 && K > 0), fn, "entries need N > 0 and K > 0");
    check_nonnull(fn, dy, "dy", M > 0 && nnz > 0);
    check_nonnull(fn, x, "x", M > 0 && nnz > 0);
    check_nonnull(fn, indices, "indices", nnz > 0);
    check_nonnull(fn, out, "out", nnz > 0);
    return check_dtype(fn, dtype_code);
}

// The checks of sparse_scatter_add on either back end; returns (weight dtype, value dtype).
inline std::pair<DType, DType> check_scatter_add(uintptr_t weight, uintptr_t indices, uintptr_t values,
                                                 uintptr_t saved, int64_t N, int64_t K, int64_t nnz,
                                                 int weight_dtype, int value_dtype) {
    const char* fn = "sparse_scatter_add";
    check_sizes(fn, N, "N", K, "K", nnz, "nnz");
    check_arg(nnz == 0 || (N > 0 && K > 0), fn, "entries need N > 0 and K > 0");
    check_nonnull(fn, weight, "weight", nnz > 0);
    check_nonnull(fn, indices, "indices", nnz > 0);
    check_nonnull(fn, values, "values", nnz > 0);
    check_nonnull(fn, saved, "saved", nnz > 0);
    return {check_dtype(fn, weight_dtype), check_dtype(fn, value_dtype)};
}

namespace cpu {
// out (nnz,) fp32 = (dy^T x) at the entries: out[k] = sum_t dy[t, r_k] * x[t, c_k].
// dy (M, N), x (M, K): same dtype.
void sparse_sddmm(uintptr_t dy, uintptr_t x, uintptr_t indices, uintptr_t row_ptr, uintptr_t out,
                  int64_t M, int64_t N, int64_t K, int64_t nnz, int dtype_code);
// out (M, S) += inp (M, G) gathered per segment, segments = out's columns:
//   transposed = false: S = N rows of the delta, G = K, gather column c = indices[e] - s * K,
//                       value values[e]                      (y += x Delta^T)
//   transposed = true:  S = K columns, G = N, gather row t_rows[e], value values[t_perm[e]]
//                                                              (dx += dy Delta)
// Each out element is read once and written once: out = round(out + fp32 sum over the segment).
void sparse_spmm(uintptr_t out, uintptr_t inp, uintptr_t seg_ptr, uintptr_t gather, uintptr_t values,
                 uintptr_t perm, int64_t M, int64_t S, int64_t G, int64_t nnz, bool transposed,
                 int io_dtype, int value_dtype);
// weight[r_k * stride_r + c_k * stride_c] = round(weight + values[k]) (fp32 sum), after saving the old
// entry to saved[k] (the weight's dtype): what merge/unmerge need to restore the weight bit for bit.
void sparse_scatter_add(uintptr_t weight, int64_t stride_r, int64_t stride_c, uintptr_t indices,
                        uintptr_t values, uintptr_t saved, int64_t N, int64_t K, int64_t nnz,
                        int weight_dtype, int value_dtype);
}  // namespace cpu

namespace cuda {
// out (splits, nnz) fp32 partial sums of the SDDMM, split s over tokens [s * t_per_split, ...):
// the caller sums them (deterministic, no atomics). dy and x are strided (M, N) / (M, K).
void sparse_sddmm(uintptr_t dy, uintptr_t x, uintptr_t indices, uintptr_t out, int64_t M, int64_t N,
                  int64_t K, int64_t nnz, int64_t stride_dym, int64_t stride_dyn, int64_t stride_xm,
                  int64_t stride_xk, int64_t t_per_split, int64_t splits, int dtype_code,
                  uintptr_t stream);
// As cpu::sparse_scatter_add, on the device.
void sparse_scatter_add(uintptr_t weight, int64_t stride_r, int64_t stride_c, uintptr_t indices,
                        uintptr_t values, uintptr_t saved, int64_t N, int64_t K, int64_t nnz,
                        int weight_dtype, int value_dtype, uintptr_t stream);
}  // namespace cuda

}  // namespace tunefast
