// Counter-based Philox-4x32-10 dropout draw shared by the C++ (CPU) and CUDA kernels.
//
// The definition lives in tunefast/reference/dropout.py; this header must reproduce it bit for bit:
//   key (seed lo, seed hi), counter (offset lo, offset hi, 0, 0), draw = c0 after 10 rounds,
//   keep iff draw >= threshold, threshold in [0, 2^32] (2^32 drops everything, hence uint64).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TF_HOST_DEVICE inline
#endif

namespace tunefast {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;

TF_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
    // nvcc keeps a 64-bit product of zero-extended words as a 64-bit multiply chain; this is one
    // IMAD.HI and one IMAD, as in cuRAND.
    hi = __umulhi(a, b);
    lo = a * b;
#else
    const uint64_t product = static_cast<uint64_t>(a) * b;
    hi = static_cast<uint32_t>(product >> 32);
    lo = static_cast<uint32_t>(product);
#endif
}

// One Philox block per element and only its first word used, as the reference defines it: the
// draw of an element then depends on its offset alone, whatever the tiling of the kernel that
// regenerates it (Triton block, CUDA thread, OpenMP chunk).
// The four output words of Philox-4x32-10 for one counter; element offset o uses word (o & 3) of
// counter (o >> 2) (tunefast/reference/dropout.py).
TF_HOST_DEVICE void philox_block(uint64_t seed, uint64_t counter, uint32_t out[4]) {
    uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
    uint32_t c2 = 0, c3 = 0;
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int round = 0; round < 10; ++round) {
        uint32_t hi_b, lo_b, hi_a, lo_a;
        mul_hi_lo(kPhiloxRoundB, c2, hi_b, lo_b);
        mul_hi_lo(kPhiloxRoundA, c0, hi_a, lo_a);
        c0 = hi_b ^ c1 ^ k0;
        c1 = lo_b;
        c2 = hi_a ^ c3 ^ k1;
        c3 = lo_a;
        k0 += kPhiloxKeyA;
        k1 += kPhiloxKeyB;
    }
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

TF_HOST_DEVICE uint32_t philox_draw(uint64_t seed, uint64_t offset) {
    uint32_t words[4];
    philox_block(seed, offset >> 2, words);
    return words[offset & 3];
}

TF_HOST_DEVICE bool philox_keep(uint64_t seed, uint64_t offset, uint64_t threshold) {
    return static_cast<uint64_t>(philox_draw(seed, offset)) >= threshold;
}

}  // namespace tunefast
