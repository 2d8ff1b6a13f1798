// tunefast._C: CPU kernels on raw data pointers (ints from tensor.data_ptr()).
#include "bindings.h"
#include "dropout.h"
#include "sparse.h"

#ifdef _OPENMP
#include <omp.h>
#endif

PYBIND11_MODULE(_C, m) {
    using namespace tunefast::cpu;
    m.doc() = "tunefast CPU kernels (OpenMP when built with it). Pointers are tensor.data_ptr() ints "
              "of contiguous row-major (rows, cols) matrices; see tunefast/_native.py for the torch API.";
    tunefast::def_shared_kernels(m, &keep_mask, &dropout_apply, &dropout_add, &sparse_scatter_add);
    m.def("sparse_sddmm", &sparse_sddmm, tunefast::NoGil(), "dy_ptr"_a, "x_ptr"_a, "indices_ptr"_a,
          "row_ptr_ptr"_a, "out_ptr"_a, "M"_a, "N"_a, "K"_a, "nnz"_a, "dtype_code"_a,
          "out (nnz,) fp32 = (dy^T x) at the delta's entries; dy (M, N), x (M, K). See csrc/sparse.h.");
    m.def("sparse_spmm", &sparse_spmm, tunefast::NoGil(), "out_ptr"_a, "inp_ptr"_a, "seg_ptr_ptr"_a,
          "gather_ptr"_a, "values_ptr"_a, "perm_ptr"_a, "M"_a, "S"_a, "G"_a, "nnz"_a, "transposed"_a,
          "io_dtype"_a, "value_dtype"_a,
          "out (M, S) += inp (M, G) times the delta (CSR) or its transpose (CSC). See csrc/sparse.h.");
#ifdef _OPENMP
    m.attr("openmp") = true;
    m.def("max_threads", [] { return omp_get_max_threads(); });
#else
    m.attr("openmp") = false;
    m.def("max_threads", [] { return 1; });
#endif
}
