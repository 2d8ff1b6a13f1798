// tunefast._C_cuda: CUDA dropout kernels on raw device pointers, launched on a caller-given stream.
// Compiled by the host compiler: pybind11 stays out of nvcc, the kernels live in dropout_cuda.cu.
#include <pybind11/pybind11.h>

#include "dropout.h"
#include "sparse.h"

namespace py = pybind11;
using namespace pybind11::literals;

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "tunefast CUDA kernels. Pointers are device tensor.data_ptr() ints of contiguous "
              "row-major (rows, cols) matrices; stream is torch.cuda.current_stream().cuda_stream.";
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("keep_mask", &tunefast::cuda::keep_mask, nogil, "out"_a, "rows"_a, "cols"_a, "row_start"_a,
          "seed"_a, "threshold"_a, "stream"_a, "Write the 0/1 uint8 keep mask of rows row_start.. to out.");
    m.def("dropout_apply", &tunefast::cuda::dropout_apply, nogil, "in_ptr"_a, "out_ptr"_a, "rows"_a,
          "cols"_a, "dtype_code"_a, "seed"_a, "threshold"_a, "scale"_a, "stream"_a,
          "row_start"_a = 0, "out = in * keep * scale; dtype_code 0=float32, 1=float16, 2=bfloat16.");
    m.def("dropout_add", &tunefast::cuda::dropout_add, nogil, "dst_ptr"_a, "src_ptr"_a, "rows"_a,
          "cols"_a, "dtype_code"_a, "seed"_a, "threshold"_a, "scale"_a, "stream"_a,
          "row_start"_a = 0, "dst += keep * src * scale, in place; dtype_code as in dropout_apply.");
    m.def("sparse_sddmm", &tunefast::cuda::sparse_sddmm, nogil, "dy_ptr"_a, "x_ptr"_a, "indices_ptr"_a,
          "out_ptr"_a, "M"_a, "N"_a, "K"_a, "nnz"_a, "stride_dym"_a, "stride_dyn"_a, "stride_xm"_a,
          "stride_xk"_a, "t_per_split"_a, "splits"_a, "dtype_code"_a, "stream"_a,
          "out (splits, nnz) fp32 partial sums of (dy^T x) at the delta's entries. See csrc/sparse.h.");
    m.def("sparse_scatter_add", &tunefast::cuda::sparse_scatter_add, nogil, "weight_ptr"_a, "stride_r"_a,
          "stride_c"_a, "indices_ptr"_a, "values_ptr"_a, "saved_ptr"_a, "N"_a, "K"_a, "nnz"_a,
          "weight_dtype"_a, "value_dtype"_a, "stream"_a,
          "saved[k] = w[k-th entry]; w[entry] = round(w + values[k]).");
    m.def("device_count", &tunefast::cuda::device_count,
          "Number of visible GPUs; raises RuntimeError naming the CUDA error (e.g. no driver).");
    m.attr("runtime_version") = tunefast::cuda::runtime_version();
    m.attr("archs") = TUNEFAST_CUDA_ARCHS;
}
