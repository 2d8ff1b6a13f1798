// tunefast._C: CPU dropout kernels on raw data pointers (ints from tensor.data_ptr()).
#include <pybind11/pybind11.h>

#include "dropout.h"

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
#ifdef _OPENMP
    m.attr("openmp") = true;
    m.def("max_threads", [] { return omp_get_max_threads(); });
#else
    m.attr("openmp") = false;
    m.def("max_threads", [] { return 1; });
#endif
}
