"""Counter-based dropout keep decisions inside Triton kernels.

The definition lives in ``tunefast/reference/dropout.py``; the C++ and CUDA copies in ``csrc/`` and this
one must agree bit for bit (tests/test_native.py checks the C++/CUDA copies, tests/test_lora_op.py and
tests/test_prefix_attention_op.py the Triton kernels, against the reference).

Written out here rather than calling ``tl.randint`` so that the mask cannot change with the Triton
version: the GPU machine runs Triton 3.6, CI runs 3.8, and a mask that differs between forward and a
recomputed forward would silently corrupt gradients.

Caution: here each element still evaluates its own Philox block (10 rounds, ~40 integer ops) and
picks its word; computing one block per four elements needs a (BLOCK, BLOCK/4, 4) reshape of the
tile, not done yet. For a memory-bound kernel reading bf16 this cost is comparable to the loads on an
H200; the C++ kernel already evaluates one block per four elements.
"""

import triton
import triton.language as tl


@triton.jit
def philox_keep(seed, offsets, threshold):
    """Keep decision (bool tile) for int64 element ``offsets`` under an int64 ``seed``.

    ``threshold`` is min(floor(p * 2**32), 2**32) as int64: an element is kept iff its uint32 draw >=
    threshold.
    """
    ROUND_A: tl.constexpr = 0xD2511F53
    ROUND_B: tl.constexpr = 0xCD9E8D57
    KEY_A: tl.constexpr = 0x9E3779B9
    KEY_B: tl.constexpr = 0xBB67AE85
    seed = seed.to(tl.int64)
    q = offsets >> 2  # one Philox block serves four consecutive offsets (word = offset & 3)
    c0 = (q & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((q >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    for _ in tl.static_range(10):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(ROUND_B, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(ROUND_A, _c0) ^ c3 ^ k1
        c1 = _c2 * ROUND_B
        c3 = _c0 * ROUND_A
        k0 = k0 + KEY_A
        k1 = k1 + KEY_B
    word = offsets & 3
    draw = tl.where(word == 0, c0, tl.where(word == 1, c1, tl.where(word == 2, c2, c3)))
    return draw.to(tl.int64) >= threshold
