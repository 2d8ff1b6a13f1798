// Host-side argument checks and the dtype switch shared by the CPU (*_cpu.cpp) and CUDA (*.cu) entry
// points. Everything here runs on the host before any kernel; std::invalid_argument reaches Python as
// ValueError, with a message that starts with the entry point's name.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace tunefast {

// The dtype codes of every entry point: 0 float32, 1 float16, 2 bfloat16 (tunefast/_native.py).
enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline void check_arg(bool ok, const char* fn, const std::string& what) {
    if (!ok) throw std::invalid_argument(std::string(fn) + ": " + what);
}

inline DType check_dtype(const char* fn, int code) {
    check_arg(code >= 0 && code <= 2, fn,
              "dtype_code must be 0 (float32), 1 (float16) or 2 (bfloat16), got " + std::to_string(code));
    return static_cast<DType>(code);
}

// The one switch over dtypes: dispatch(d, fn) calls fn(F32{}), fn(F16{}) or fn(BF16{}) for d, and
// dispatch(a, b, fn) calls fn(tag of a, tag of b) (operands and values of the sparse kernels). Each back
// end names its tag types in one `dispatch` object: csrc/dtypes_cpu.h (conversion structs) and
// csrc/dtypes_cuda.cuh (the CUDA scalar types).
template <typename F32, typename F16, typename BF16>
struct DTypeSwitch {
    template <typename Fn>
    void operator()(DType d, Fn&& fn) const {
        switch (d) {
            case DType::Float32: fn(F32{}); break;
            case DType::Float16: fn(F16{}); break;
            case DType::BFloat16: fn(BF16{}); break;
        }
    }
    template <typename Fn>
    void operator()(DType a, DType b, Fn&& fn) const {
        (*this)(a, [&](auto ta) { (*this)(b, [&](auto tb) { fn(ta, tb); }); });
    }
};

}  // namespace tunefast
