// tunefast._C: CPU dropout kernels on raw data pointers (ints from tensor.data_ptr()).
#include <pybind11/pybind11.h>

#include "dropout.h"
#include "sparse.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_C, m) {
    m.doc() = "tunefast CPU kernels (OpenMP when built with it). Pointers are tensor.data_ptr() ints "
              "of contiguous row-major (rows, cols) matrices; see tunefast/_native.py for the torch API.";
    // The kernels never touch Python objects, so other Python threads may run meanwhile.
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("keep_mask", &tunefast::cpu::keep_mask, nogil, "out"_a, "rows"_a, "cols"_a, "row_start"_a,
          "seed"_a, "threshold"_a, "Write the 0/1 uint8 keep mask of rows row_start.. to out.");
    m.def("dropout_apply", &tunefast::cpu::dropout_apply, nogil, "in_ptr"_a, "out_ptr"_a, "rows"_a,
          "cols"_a, "dtype_code"_a, "seed"_a, "threshold"_a, "scale"_a, "row_start"_a = 0,
          "out = in * keep * scale; dtype_code 0=float32, 1=float16, 2=bfloat16.");
    m.def("dropout_add", &tunefast::cpu::dropout_add, nogil, "dst_ptr"_a, "src_ptr"_a, "rows"_a,
          "cols"_a, "dtype_code"_a, "seed"_a, "threshold"_a, "scale"_a, "row_start"_a = 0,
          "dst += keep * src * scale, in place; dtype_code as in dropout_apply.");
    m.def("sparse_sddmm", &tunefast::cpu::sparse_sddmm, nogil, "dy_ptr"_a, "x_ptr"_a, "indices_ptr"_a,
          "row_ptr_ptr"_a, "out_ptr"_a, "M"_a, "N"_a, "K"_a, "nnz"_a, "dtype_code"_a,
          "out (nnz,) fp32 = (dy^T x) at the delta's entries; dy (M, N), x (M, K). See csrc/sparse.h.");
    m.def("sparse_spmm", &tunefast::cpu::sparse_spmm, nogil, "out_ptr"_a, "inp_ptr"_a, "seg_ptr_ptr"_a,
          "gather_ptr"_a, "values_ptr"_a, "perm_ptr"_a, "M"_a, "S"_a, "G"_a, "nnz"_a, "transposed"_a,
          "io_dtype"_a, "value_dtype"_a,
          "out (M, S) += inp (M, G) times the delta (CSR) or its transpose (CSC). See csrc/sparse.h.");
    m.def("sparse_scatter_add", &tunefast::cpu::sparse_scatter_add, nogil, "weight_ptr"_a, "stride_r"_a,
          "stride_c"_a, "indices_ptr"_a, "values_ptr"_a, "saved_ptr"_a, "N"_a, "K"_a, "nnz"_a,
          "weight_dtype"_a, "value_dtype"_a, "saved[k] = w[k-th entry]; w[entry] = round(w + values[k]).");
#ifdef _OPENMP
    m.attr("openmp") = true;
    m.def("max_threads", [] { return omp_get_max_threads(); });
#else
    m.attr("openmp") = false;
    m.def("max_threads", [] { return 1; });
#endif
}
