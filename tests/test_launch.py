"""kernels/launch.py: the smem rule, fixed vs autotuned choice, capture for the AOT check, precision and
upcast rules. Runs on CPU (the interpreter for real launches, capture for GPU decisions)."""

import pytest
import torch
import triton
import triton.language as tl

from tunefast.kernels import launch


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, size_key, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask, other=0.0) * factor, mask=mask)


def _configs(arch, named):
    return [triton.Config(dict(BLOCK=b), num_warps=4, num_stages=s) for b, s in ((4096, 4), (1024, 3), (256, 2))]


# smem estimate: BLOCK x stages x 4 bytes x 8 (a pretend pipeline): 512 KiB, 96 KiB, 16 KiB
_TOY = launch.Kernel(_scale_kernel, configs=_configs, smem=lambda c, named: c.kwargs["BLOCK"] * c.num_stages * 32,
                     interpret=dict(BLOCK=64))


def _scale(x, factor):
    y = torch.empty_like(x)
    n = x.numel()
    _TOY.launch(lambda c: (triton.cdiv(n, c["BLOCK"]),), (x, y, n, factor, launch.size_key(n)), {}, like=x)
    return y


def test_interpreter_launch_runs_the_interpret_config():
    x = torch.randn(300)
    torch.testing.assert_close(_scale(x, 3.0), 3.0 * x)


def test_capture_records_choosable_configs_by_each_archs_shared_memory():
    x = torch.randn(300)
    got = {}
    for cap, arch in launch.ARCHES.items():
        with launch.capture(arch) as launches:
            y = _scale(x, 2.0)
        assert len(launches) == 1 and launches[0].kernel is _TOY and launches[0].arch is arch
        got[cap] = [c.kwargs["BLOCK"] for c in launches[0].choosable]
        assert launches[0].fixed is launches[0].choosable[0]
        assert launches[0].args[0] is x and launches[0].args[1] is y  # nothing ran: y is untouched storage
    # 512 KiB fits nothing; 96 KiB (98,304 B) fits all three, the RTX 4090 (101,376 B) only just
    assert got == {80: [1024, 256], 89: [1024, 256], 90: [1024, 256]}
    small = launch.Arch(80, 50_000, 108)
    with launch.capture(small) as launches:
        _scale(x, 2.0)
    assert [c.kwargs["BLOCK"] for c in launches[0].choosable] == [256]
    tiny = launch.Arch(80, 1_000, 108)
    with launch.capture(tiny) as launches:
        _scale(x, 2.0)
    assert [c.kwargs["BLOCK"] for c in launches[0].choosable] == [256]  # none fits: the smallest, reported by AOT


def test_capture_does_not_nest_and_restores_the_cpu_path():
    with launch.capture(launch.ARCHES[90]):
        assert launch.on_gpu(torch.zeros(1))
        with pytest.raises(RuntimeError, match="does not nest"):
            with launch.capture(launch.ARCHES[80]):
                pass
    assert not launch.on_gpu(torch.zeros(1))


def _lora_choosable(dtype, **kw):
    """{arch: (choosable config names, the Captured)} of one fused LoRA forward launch (rank 16)."""
    from tunefast.kernels import lora as kl

    x, w = torch.empty(64, 256, dtype=dtype), torch.empty(192, 256, dtype=dtype)
    xa, b = torch.empty(64, 16, dtype=dtype), torch.empty(192, 16, dtype=dtype)
    out = {}
    for cap in (80, 89, 90):
        with launch.capture(launch.ARCHES[cap]) as launches:
            kl.lora_linear(torch.empty(64, 192, dtype=dtype), x, w.t(), None, xa, b.t(), 1.0, **kw)
        out[cap] = ({launch.config_name(cfg) for cfg in launches[0].choosable}, launches[0])
    return out


def test_lora_choosable_tiles_fit_each_archs_shared_memory():
    for dtype in (torch.float32, torch.float16):
        choosable = _lora_choosable(dtype)
        for cap, (names, c) in choosable.items():
            named = c.kernel.named(c.args, c.meta)
            assert all(c.kernel.smem(cfg, named) <= launch.ARCHES[cap].smem for cfg in c.choosable)
            every = {launch.config_name(cfg) for cfg in c.kernel.configs(c.arch, named)}
            assert names < every  # the register rule dropped some
        # the register rule binds first: the tiles it keeps fit even the RTX 4090's 99 KiB
        assert choosable[80][0] == choosable[89][0] == choosable[90][0]


def test_register_rule_drops_tiles_that_spill_from_the_autotune_list_only():
    from tunefast.kernels import lora as kl

    # The fused forward holds two fp32 (BLOCK_M x BLOCK_N) accumulators: 128 x 128 on 4 warps is 256
    # registers per thread (AOT: spilled up to 63 KB), 64 x 64 on 4 warps 64.
    fp16, fp32 = _lora_choosable(torch.float16), _lora_choosable(torch.float32)
    fp16_drop = _lora_choosable(torch.float16, seed=torch.zeros(1, dtype=torch.int64), threshold=1 << 30)
    for got in (fp16, fp32, fp16_drop):
        for names, c in got.values():
            named = c.kernel.named(c.args, c.meta)
            assert c.choosable and all(c.kernel.regs(cfg, named) <= launch.TILE_REGS for cfg in c.choosable)
            assert "BLOCK_M=128 BLOCK_N=128 BLOCK_K=32 GROUP_M=8 w4 s4" not in names
    # fp16: 128 x 64 (2 tiles x 64 registers) stays; fp32 operands count double, dropout's mask 2 tiles more
    assert "BLOCK_M=128 BLOCK_N=64 BLOCK_K=32 GROUP_M=8 w4 s4" in fp16[90][0]
    assert "BLOCK_M=128 BLOCK_N=64 BLOCK_K=32 GROUP_M=8 w4 s4" not in fp32[90][0]
    assert "BLOCK_M=128 BLOCK_N=64 BLOCK_K=32 GROUP_M=8 w4 s4" not in fp16_drop[90][0]
    assert fp16_drop[90][0] < fp16[90][0]
    # fp32 operands: only the lean fp32 tiles pass (the fixed one among them), so autotuning still chooses
    assert fp32[90][0] == {launch.config_name(c) for c in launch.matmul_configs(kl._FP32_TILES)}
    # the fixed config (TUNEFAST_AUTOTUNE=0) is its own rule, checked clean by the AOT check
    assert launch.config_name(fp16[90][1].fixed) == "BLOCK_M=64 BLOCK_N=64 BLOCK_K=32 GROUP_M=8 w8 s3"


def test_register_rule_keeps_the_leanest_when_none_fits():
    def toy(cols):  # BLOCK x cols fp32 values over 4 warps: 4096 / 1024 / 256 rows -> 32 / 8 / 2 x cols
        return launch.Kernel(_scale_kernel, configs=_configs, smem=lambda c, named: 0, interpret=dict(BLOCK=64),
                             regs=lambda c, named: launch.tile_regs(c, c.kwargs["BLOCK"], cols))

    named = dict(x_ptr=None)
    try:
        wide, narrow = toy(64), toy(2)
        assert [c.kwargs["BLOCK"] for c in wide.choosable(launch.ARCHES[90], named)] == [256]  # 128 registers
        assert [c.kwargs["BLOCK"] for c in narrow.choosable(launch.ARCHES[90], named)] == [4096, 1024, 256]
        assert [c.kwargs["BLOCK"] for c in toy(512).choosable(launch.ARCHES[90], named)] == [256]  # 1024: leanest
        with_fixed = toy(512)
        lone = triton.Config(dict(BLOCK=64), num_warps=4, num_stages=2)
        with_fixed.fixed = lambda arch, named, fits: lone
        assert with_fixed.choosable(launch.ARCHES[90], named) == [lone]  # none fits: the fixed config alone
    finally:
        del launch.KERNELS[-4:]
    assert launch.tile_regs(triton.Config({}, num_warps=4), 64, 64, count=2, elem=2) == 32


def test_precision_follows_torch_on_a_gpu_only():
    x = torch.zeros(1)
    saved = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert launch.precision(x) == "ieee"  # the interpreter has no TF32
        with launch.capture(launch.ARCHES[90]):
            assert launch.precision(x) == "tf32"
            torch.set_float32_matmul_precision("highest")
            assert launch.precision(x) == "ieee"
    finally:
        torch.set_float32_matmul_precision(saved)


def test_upcast_rules():
    bf, f32, f16 = torch.zeros(1, dtype=torch.bfloat16), torch.zeros(1), torch.zeros(1, dtype=torch.float16)
    assert launch.upcast(bf, f32) and launch.upcast(bf, bf) and launch.upcast(f16, f16)  # interpreter: no bf16 dots
    assert not launch.upcast(f32, f32)
    with launch.capture(launch.ARCHES[90]):
        assert launch.upcast(bf, f32) and not launch.upcast(bf, bf) and not launch.upcast(f16, f16)


def test_autotune_switch(monkeypatch):
    monkeypatch.setenv("TUNEFAST_AUTOTUNE", "0")
    assert not launch.autotune_enabled()
    with launch.set_autotune(True):
        assert launch.autotune_enabled()
    monkeypatch.setenv("TUNEFAST_AUTOTUNE", "1")
    assert launch.autotune_enabled()
    with launch.set_autotune(False):
        assert not launch.autotune_enabled()


def test_size_key_buckets():
    assert launch.size_key(1000, 64) == launch.size_key(1023, 64)
    assert launch.size_key(1000, 64) != launch.size_key(1024, 64)
    assert launch.size_key(1000, 64) != launch.size_key(1000, 128)


def test_named_arguments_are_checked():
    with pytest.raises(TypeError, match="_scale_kernel"):
        _TOY.named(tuple(range(6)), {"BLOCK": 1, "EXTRA": 2})


def test_prefix_attention_fixed_tiles_by_dtype_extras_and_arch():
    """fp32 attention dots run on FMA units (ieee): the fixed tiles are 16/32 wide; dropout or a bias picks
    the smaller first tiles; fp32 dK/dV at D = 128 differs between sm_80 and sm_90 (what ptxas kept clean)."""
    from tunefast.kernels import prefix_attention as kpa

    def fixed(dtype, d, cap, **extra):
        q = torch.empty(1, 2, 40, d, dtype=dtype)
        k, pk = torch.empty(1, 2, 40, d, dtype=dtype), torch.empty(2, 4, d, dtype=dtype)
        out, lse = torch.empty_like(q), torch.empty(1, 2, 40)
        with launch.capture(launch.ARCHES[cap]) as launches:
            kpa.attention_forward(q, k, k, pk, pk, None, True, 0.1, out, lse, **extra)
            kpa.attention_backward(q, q, k, k, pk, pk, out, lse, None, True, 0.1, out, k, k, **extra)
        for c in launches:
            assert c.kernel.smem(c.fixed, c.kernel.named(c.args, c.meta)) <= launch.ARCHES[cap].smem
        return {c.kernel.name + ("/prefix" if c.meta.get("PREFIX") else ""): (c.fixed.kwargs.get("BLOCK_M"),
                c.fixed.kwargs.get("BLOCK_N"), c.fixed.num_warps) for c in launches}

    for cap in (80, 89, 90):
        for d in (64, 128, 256):
            tiles = fixed(torch.float32, d, cap)
            limit = 1024 if d <= 64 else 512  # fp32, D = 128: 64 x 32 x 4 warps spilled 9.6 KB/thread
            assert all(m * n <= limit for name, (m, n, w) in tiles.items() if name != "_delta_kernel")
    assert fixed(torch.float32, 128, 90)["_dkdv_kernel"] == (16, 32, 8)
    assert fixed(torch.float32, 128, 80)["_dkdv_kernel"] == (16, 16, 4)
    plain = fixed(torch.float16, 64, 90)["_fwd_kernel"]
    heavy = fixed(torch.float16, 64, 90, dropout=(1, 1 << 30, 1.5))["_fwd_kernel"]
    assert heavy[0] * heavy[1] < plain[0] * plain[1]
