// Scalar float <-> storage conversions for the CPU kernels, rounding exactly as c10 does on CPU
// (round to nearest even; fp16 via the FP16 library's bit tricks), so that native results equal
// PyTorch's bit for bit. Shared by dropout_cpu.cpp and sparse_cpu.cpp.
#pragma once

#include <cstdint>
#include <cstring>

#include "checks.h"  // DTypeSwitch

namespace tunefast {
namespace cpu_dtypes {

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }

struct Float32 {
    using T = float;
    static float load(T v) { return v; }
    static T store(float v) { return v; }
};

struct BFloat16 {
    using T = uint16_t;
    static float load(T v) { return bits_to_float(uint32_t(v) << 16); }
    static T store(float v) {  // round to nearest even, as c10::BFloat16
        const uint32_t u = float_to_bits(v);
        if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;  // NaN
        return T((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
};

// IEEE half conversions from the FP16 library (Maratyszcza, MIT), the code c10::Half uses on CPU.
struct Float16 {
    using T = uint16_t;
    static float load(T h) {
        const uint32_t w = uint32_t(h) << 16;
        const uint32_t sign = w & 0x80000000u;
        const uint32_t two_w = w + w;
        const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
        const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
        return bits_to_float(sign | (two_w < (1u << 27) ? float_to_bits(denormalized)
                                                          : float_to_bits(normalized)));
    }
    static T store(float f) {  // round to nearest even; overflow -> inf, NaN -> 0x7E00
        float base = (f < 0 ? -f : f) * 0x1.0p+112f * 0x1.0p-110f;
        const uint32_t w = float_to_bits(f);
        const uint32_t shl1_w = w + w;
        const uint32_t sign = w & 0x80000000u;
        uint32_t bias = shl1_w & 0xFF000000u;
        if (bias < 0x71000000u) bias = 0x71000000u;
        base = bits_to_float((bias >> 1) + 0x07800000u) + base;
        const uint32_t bits = float_to_bits(base);
        const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
        return T((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
    }
};

// dispatch(d, fn) / dispatch(a, b, fn): fn gets the conversion struct of each dtype code (csrc/checks.h).
inline constexpr DTypeSwitch<Float32, Float16, BFloat16> dispatch{};

}  // namespace cpu_dtypes
}  // namespace tunefast
