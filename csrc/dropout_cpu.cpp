// CPU (OpenMP) dropout kernels: the fast CPU path of the reference op.
//
// Results equal PyTorch's CPU `x * mask * scale` (and `dst + that`) bit for bit: PyTorch computes
// every elementwise op on fp16/bf16 in fp32 with the Python scalar rounded to fp32 and rounds the
// result once per op, so we do the same. Built with -ffp-contract=off: an FMA fused from
// `dst + x * scale` would round once instead of twice and break that equality.
#include "dropout.h"
#include "dtypes_cpu.h"
#include "philox.h"

#include <cstring>

namespace tunefast {
namespace {

using namespace cpu_dtypes;

// Measured on a 2-core x86 box: ~5 ns per element on one thread with a Philox block per element (the
// first version), and two threads already win at 1k elements. Waking a large team costs several
// microseconds, so start at 4096 (~20 us of work).
constexpr int64_t kParallelMinElements = 4096;

// fn(i, keep) for the n elements at offsets first_offset + i, one Philox block per four elements
// (the four words of counter q serve offsets 4q .. 4q+3): 4x fewer rounds than a draw per element.
template <typename Fn>
void for_each_keep(int64_t n, uint64_t first_offset, uint64_t seed, uint64_t threshold, Fn&& fn) {
    if (n <= 0) return;
    const uint64_t q_first = first_offset >> 2;
    const uint64_t q_last = (first_offset + uint64_t(n) - 1) >> 2;
    const int64_t blocks = int64_t(q_last - q_first) + 1;
#pragma omp parallel for schedule(static) if (n >= kParallelMinElements)
    for (int64_t b = 0; b < blocks; ++b) {
        const uint64_t q = q_first + uint64_t(b);
        uint32_t words[4];
        philox_block(seed, q, words);
        for (int j = 0; j < 4; ++j) {
            const uint64_t offset = 4 * q + uint64_t(j);
            if (offset < first_offset || offset - first_offset >= uint64_t(n)) continue;
            fn(int64_t(offset - first_offset), uint64_t(words[j]) >= threshold);
        }
    }
}

// out = dropout(src) (Add = false; src may be out) or out += dropout(src) (Add = true), for n elements.
template <typename D, bool Add>
void dropout_impl(uintptr_t out_ptr, uintptr_t src_ptr, const DropoutProblem& p, uint64_t seed,
                  uint64_t threshold) {
    auto* out = reinterpret_cast<typename D::T*>(out_ptr);
    const auto* src = reinterpret_cast<const typename D::T*>(src_ptr);
    const float scale = p.scale;
    for_each_keep(p.n, p.first_offset, seed, threshold, [&](int64_t i, bool kept) {
        const float keep = kept ? 1.0f : 0.0f;
        // x * keep first, as the reference: a dropped inf/NaN gives NaN, a dropped -x gives -0.
        const typename D::T dropped = D::store(D::load(src[i]) * keep * scale);
        if constexpr (Add) {
            // Rounded to the storage dtype before the add, as `dst + dropout(src)` does.
            out[i] = D::store(D::load(out[i]) + D::load(dropped));
        } else {
            out[i] = dropped;
        }
    });
}

}  // namespace

namespace cpu {

void keep_mask(uintptr_t out, int64_t rows, int64_t cols, int64_t row_start, uint64_t seed,
               uint64_t threshold) {
    check_problem("keep_mask", rows, cols, row_start, threshold);
    check_ptr("keep_mask", out, "out", rows, cols);
    auto* mask = reinterpret_cast<uint8_t*>(out);
    const uint64_t first_offset = uint64_t(row_start) * uint64_t(cols);
    for_each_keep(rows * cols, first_offset, seed, threshold, [&](int64_t i, bool kept) { mask[i] = kept; });
}

void dropout_apply(uintptr_t in, uintptr_t out, int64_t rows, int64_t cols, int dtype_code,
                   uint64_t seed, uint64_t threshold, double scale, int64_t row_start) {
    const DropoutProblem p =
        check_dropout("dropout_apply", in, "in", out, "out", rows, cols, dtype_code, threshold, scale, row_start);
    dispatch(p.dtype, [&](auto d) { dropout_impl<decltype(d), false>(out, in, p, seed, threshold); });
}

void dropout_add(uintptr_t dst, uintptr_t src, int64_t rows, int64_t cols, int dtype_code,
                 uint64_t seed, uint64_t threshold, double scale, int64_t row_start) {
    const DropoutProblem p =
        check_dropout("dropout_add", dst, "dst", src, "src", rows, cols, dtype_code, threshold, scale, row_start);
    dispatch(p.dtype, [&](auto d) { dropout_impl<decltype(d), true>(dst, src, p, seed, threshold); });
}

}  // namespace cpu
}  // namespace tunefast
