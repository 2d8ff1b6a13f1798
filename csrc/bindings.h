// The pybind11 definitions that tunefast._C (bindings_cpu.cpp) and tunefast._C_cuda (bindings_cuda.cpp)
// share: the same names, arguments and docstrings, the CUDA module adding a trailing `stream` argument
// (before row_start, which has a default). Host compiler only: pybind11 stays out of nvcc. Included by
// those two files alone, so its `py` alias and "name"_a literals are theirs too.
#pragma once

#include <pybind11/pybind11.h>

namespace py = pybind11;
using namespace pybind11::literals;  // "name"_a

namespace tunefast {

// The kernels never touch Python objects, so other Python threads may run meanwhile.
using NoGil = py::call_guard<py::gil_scoped_release>;

// Defines keep_mask, dropout_apply, dropout_add and sparse_scatter_add on m from one back end's
// functions; `stream` is nothing (CPU) or pybind11's "stream"_a (CUDA).
template <typename KeepMask, typename Apply, typename Add, typename ScatterAdd, typename... Stream>
void def_shared_kernels(py::module_& m, KeepMask keep_mask, Apply apply, Add add, ScatterAdd scatter_add,
                        Stream... stream) {
    const NoGil nogil;
    m.def("keep_mask", keep_mask, nogil, "out"_a, "rows"_a, "cols"_a, "row_start"_a, "seed"_a,
          "threshold"_a, stream..., "Write the 0/1 uint8 keep mask of rows row_start.. to out.");
    m.def("dropout_apply", apply, nogil, "in_ptr"_a, "out_ptr"_a, "rows"_a, "cols"_a,
          "dtype_code"_a, "seed"_a, "threshold"_a, "scale"_a, stream..., "row_start"_a = 0,
          "out = in * keep * scale; dtype_code 0=float32, 1=float16, 2=bfloat16.");
    m.def("dropout_add", add, nogil, "dst_ptr"_a, "src_ptr"_a, "rows"_a, "cols"_a, "dtype_code"_a,
          "seed"_a, "threshold"_a, "scale"_a, stream..., "row_start"_a = 0,
          "dst += keep * src * scale, in place; dtype_code as in dropout_apply.");
    m.def("sparse_scatter_add", scatter_add, nogil, "weight_ptr"_a, "stride_r"_a, "stride_c"_a,
          "indices_ptr"_a, "values_ptr"_a, "saved_ptr"_a, "N"_a, "K"_a, "nnz"_a,
          "weight_dtype"_a, "value_dtype"_a, stream...,
          "saved[k] = w[k-th entry]; w[entry] = round(w + values[k]).");
}

}  // namespace tunefast
