// tunefast._C_cuda: CUDA kernels on raw device pointers, launched on a caller-given stream.
// Compiled by the host compiler: pybind11 stays out of nvcc, the kernels live in the .cu files.
#include "bindings.h"
#include "dropout.h"
#include "sparse.h"

PYBIND11_MODULE(_C_cuda, m) {
    using namespace tunefast::cuda;
    m.doc() = "tunefast CUDA kernels. Pointers are device tensor.data_ptr() ints of contiguous "
              "row-major (rows, cols) matrices; stream is torch.cuda.current_stream().cuda_stream.";
    tunefast::def_shared_kernels(m, &keep_mask, &dropout_apply, &dropout_add, &sparse_scatter_add, "stream"_a);
    m.def("sparse_sddmm", &sparse_sddmm, tunefast::NoGil(), "dy_ptr"_a, "x_ptr"_a, "indices_ptr"_a, "out_ptr"_a,
          "M"_a, "N"_a, "K"_a, "nnz"_a, "stride_dym"_a, "stride_dyn"_a, "stride_xm"_a, "stride_xk"_a,
          "t_per_split"_a, "splits"_a, "dtype_code"_a, "stream"_a,
          "out (splits, nnz) fp32 partial sums of (dy^T x) at the delta's entries. See csrc/sparse.h.");
    m.def("device_count", &device_count,
          "Number of visible GPUs; raises RuntimeError naming the CUDA error (e.g. no driver).");
    m.attr("runtime_version") = runtime_version();
    m.attr("archs") = TUNEFAST_CUDA_ARCHS;
}
