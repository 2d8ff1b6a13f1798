"""QLoRA: bitsandbytes weight formats (dequantisation bit for bit), the fused op, and tunefast.patch on
PEFT LoRA layers with bitsandbytes bases (parity with unpatched PEFT, report, fallbacks, bad input).

Tests that need bitsandbytes skip without it; the op tests build their weights with the plain-PyTorch
quantiser of tunefast/reference/quant.py and run anywhere (e.g. the GPU machine).

Tiny models here use in_features that are multiples of 64: bitsandbytes 0.50.2's CPU dequantisation
kernel is wrong when in_features % blocksize != 0 (blocks that straddle rows; see
test_blocks_straddling_rows_follow_the_format).
"""

import math

import peft
import pytest
import torch
import transformers as tf

import tunefast
from tests import models as M
from tests.test_patch_lora import assert_parity, assert_rel_close
from tests.tolerances import LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR, max_err
from tunefast.ops.qlora import QuantWeight, _dequantize, qlora_linear
from tunefast.profiling import SavedTensors
from tunefast.reference import quant as rq

try:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF
except ImportError:  # the GPU machine may not have it
    bnb = None

needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
BACKENDS = ["triton", "reference"]
FORMATS = ["nf4", "fp4", "nf4-dq", "int8"]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _quantise(fmt, w, blocksize=64):
    if fmt == "int8":
        return rq.quantize_int8(w)
    return rq.quantize_4bit(w, fmt[:3], blocksize, double_quant=fmt.endswith("-dq"))


def _from_bnb(packed, qs):
    nested = dict(absmax_code=qs.state2.code, absmax_scale=qs.state2.absmax, absmax_blocksize=qs.state2.blocksize,
                  offset=qs.offset) if qs.nested else {}
    return QuantWeight(packed, qs.absmax, qs.quant_type, tuple(qs.shape), qs.blocksize, dtype=qs.dtype, **nested)


def _triton_dequantize(qw, dtype, round_through=()):
    return _dequantize(qw, dtype, list(round_through), use_triton=True)


# ----------------------------------------------------------------------------------------------------
# Formats: bit for bit against bitsandbytes
# ----------------------------------------------------------------------------------------------------


def _bits(t):
    return t.view({torch.float32: torch.int32}.get(t.dtype, torch.int16))


@needs_bnb
def test_codes_match_bitsandbytes():
    assert torch.equal(rq.code("nf4"), bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(rq.code("fp4"), bnbF.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(rq.dynamic_map(), bnbF.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_code_follows_installed_bitsandbytes_sign_of_zero(quant_type):
    """fp4 nibble 0b1000 is a signed zero: bitsandbytes 0.50's CPU C kernel (and its CUDA kernel) decode
    -0.0, its pure-PyTorch backend +0.0. The code used by the fused path is what the installed
    bitsandbytes decodes on the device, bit for bit (the sign included)."""
    w = torch.zeros(1, 64)
    w[0, ::2] = torch.linspace(-1, 1, 32)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type)
    nibbles = torch.arange(16, dtype=torch.uint8)
    packed = ((nibbles << 4) | nibbles).repeat(2).unsqueeze(1)
    qs.absmax = torch.ones_like(qs.absmax)
    decoded = bnbF.dequantize_4bit(packed, qs).reshape(-1)[:32:2]  # byte i holds nibble i twice
    assert torch.equal(_bits(rq.code(quant_type)), _bits(decoded))
    if quant_type == "fp4":  # the case this guards: a signed zero in the code
        assert torch.signbit(rq.code("fp4")[8]) == torch.signbit(decoded[8])


ALL, FP32 = (torch.float32, torch.bfloat16, torch.float16), (torch.float32,)


@needs_bnb
@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "double-quant"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bit_exact_vs_bitsandbytes(quant_type, double_quant):
    """Reference and Triton dequantisation == bnb.functional.dequantize_4bit, every bit."""
    g = torch.Generator().manual_seed(0)
    # (out, in): in_features a multiple of the blocksize (see the module docstring); 4096 spans rows
    # bitsandbytes runs blocksizes >= 2048 through a torch.compile'd fallback on CPU: one, fp32 only
    cases = [((24, 64), 32, ALL), ((40, 128), 64, ALL), ((16, 256), 256, ALL), ((3, 4096), 4096, FP32)]
    for (n, k), bs, dtypes in cases:
        for dtype in dtypes:
            w = (torch.randn(n, k, generator=g) * 0.05).to(dtype)
            packed, qs = bnbF.quantize_4bit(w, blocksize=bs, compress_statistics=double_quant, quant_type=quant_type)
            want = bnbF.dequantize_4bit(packed, qs)
            qw = _from_bnb(packed, qs)
            for got in (rq.dequantize(qw, dtype), _triton_dequantize(qw, dtype)):
                assert got.dtype == want.dtype and torch.equal(got, want), (n, k, bs, dtype)
                assert torch.equal(_bits(got), _bits(want)), (n, k, bs, dtype)  # signs of zero too


@needs_bnb
def test_backward_rounding_matches_bitsandbytes():
    """bnb's 4-bit backward dequantises to the weight's original dtype, then casts: so does ours."""
    w = torch.randn(32, 64, dtype=torch.bfloat16) * 0.05
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    want = bnbF.dequantize_4bit(packed, qs).to(torch.float32)
    qw = _from_bnb(packed, qs)
    assert torch.equal(rq.dequantize(qw, torch.float32, [torch.bfloat16]), want)
    assert torch.equal(_triton_dequantize(qw, torch.float32, [torch.bfloat16]), want)
    assert not torch.equal(rq.dequantize(qw, torch.float32), want)  # the rounding matters


@needs_bnb
def test_blocks_straddling_rows_follow_the_format():
    """in_features % blocksize != 0: ours == bitsandbytes' PyTorch backend (the format's definition,
    also what its CUDA kernel computes). bitsandbytes 0.50.2's CPU C kernel disagrees here (its
    dequantised weight is several times further from the original than the quantisation error);
    PEFT on CPU computes with that, so such layers are left out of the parity tests."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute

    eager = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)  # skip torch.compile

    w = torch.randn(16, 96) * 0.05
    for double_quant in (False, True):
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
        qw = _from_bnb(packed, qs)
        absmax = rq.dequantize_absmax(qw)
        want = eager(packed.reshape(-1), absmax, rq.code("nf4"), 64, qs.shape, torch.float32)
        assert torch.equal(rq.dequantize(qw, torch.float32), want)
        assert torch.equal(_triton_dequantize(qw, torch.float32), want)


@needs_bnb
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dequant_matches_bitsandbytes(dtype):
    """W = CB * SCB / 127 exactly as bnb's MatMul8bitFp (and MatMul8bitLt's dx) forms it."""
    w = torch.randn(40, 72)
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    qw = QuantWeight(p.CB, p.SCB, "int8", (40, 72))
    want = p.CB.to(dtype, copy=True).mul_(p.SCB.unsqueeze(1).mul(1.0 / 127.0))
    assert torch.equal(rq.dequantize(qw, dtype), want)
    assert torch.equal(_triton_dequantize(qw, dtype), want)


@needs_bnb
def test_reference_quantiser_matches_bitsandbytes():
    """The quantiser that lets op tests and benchmarks run without bitsandbytes makes the same bytes
    up to rounding ties (and, under double quant, which of the code's several zeros an absmax uses)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(64, 128, generator=g) * 0.05
    mine = rq.quantize_int8(w)
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
    assert torch.equal(mine.data, p.CB) and torch.equal(mine.absmax, p.SCB)
    for quant_type in ("nf4", "fp4"):
        for double_quant in (False, True):
            mine = rq.quantize_4bit(w, quant_type, 64, double_quant)
            packed, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
            ours, theirs = rq.dequantize(mine, torch.float32), bnbF.dequantize_4bit(packed, qs)
            assert (ours == theirs).float().mean() > 0.995
            assert (ours - w).norm() <= 1.01 * (theirs - w).norm()


# ----------------------------------------------------------------------------------------------------
# The op (no bitsandbytes needed)
# ----------------------------------------------------------------------------------------------------


def _adapters(k, n, ranks=(8,), dtype=torch.float32, device=DEVICE):
    a = [(torch.randn(r, k, device=device) / math.sqrt(k)).to(dtype).requires_grad_() for r in ranks]
    b = [(torch.randn(n, r, device=device) * 0.1).to(dtype).requires_grad_() for r in ranks]
    return a, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_op_equals_dense_lora_op_on_the_dequantised_weight(fmt, backend):
    """Same math as tunefast.lora_linear on dequant(W), bit for bit: two adapters, dropout, bias,
    awkward sizes (97 tokens, 80 out features)."""
    n, k = 80, 64
    qw = _quantise(fmt, torch.randn(n, k, device=DEVICE) * 0.05)
    weight = rq.dequantize(qw, torch.float32)
    a, b = _adapters(k, n, ranks=(8, 4))
    bias = torch.randn(n, device=DEVICE)
    x = torch.randn(97, k, device=DEVICE, requires_grad=True)
    outs = []
    for fn, w in ((qlora_linear, qw), (tunefast.lora_linear, weight)):
        torch.manual_seed(7)  # same dropout seeds
        y = fn(x, w, bias, a, b, [0.5, 2.0], [0.1, 0.0], backend=backend)
        grads = torch.autograd.grad(y.square().sum(), [x, *a, *b])
        outs.append((y, *grads))
    for got, want in zip(*outs):
        assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_keeps_no_dense_weight_for_backward(backend):
    n, k = 64, 128
    qw = _quantise("nf4-dq", torch.randn(n, k, device=DEVICE) * 0.05)
    a, b = _adapters(k, n)
    x = torch.randn(2, 16, k, device=DEVICE, requires_grad=True)
    quant = [qw.data, qw.absmax, qw.absmax_code, qw.absmax_scale, qw.offset]
    with SavedTensors(exclude=[*a, *b, *quant]) as rec:
        y = qlora_linear(x, qw, None, a, b, [2.0], [0.1], backend=backend)
    assert all(t.numel() < n * k for t in rec.tensors), [tuple(t.shape) for t in rec.tensors]
    # exactly what the dense LoRA op keeps besides its weight: x (for dA), x A^T, one seed
    weight = rq.dequantize(qw, torch.float32)
    with SavedTensors(exclude=[*a, *b, weight]) as dense:
        tunefast.lora_linear(x, weight, None, a, b, [2.0], [0.1], backend=backend)
    assert rec.bytes == dense.bytes == x.numel() * 4 + 32 * 8 * 4 + 8
    y.sum().backward()
    assert a[0].grad is not None and x.grad.shape == x.shape


def test_op_bfloat16_within_low_precision_rule():
    """bf16 x: the op's error against an fp64 oracle on the same dequantised weight is at most
    LOW_PRECISION_FACTOR x PyTorch's own bf16 error (the rule of tests/tolerances.py)."""
    n, k = 96, 128
    qw = _quantise("nf4-dq", torch.randn(n, k) * 0.05)
    a, b = _adapters(k, n)
    x = torch.randn(64, k)
    for backend in BACKENDS:
        y = qlora_linear(x.bfloat16(), qw, None, a, b, [2.0], backend=backend)
        w64 = rq.dequantize(qw, torch.float64)
        oracle = x.double() @ w64.t() + 2.0 * (x.double() @ a[0].double().t()) @ b[0].double().t()
        torch_bf16 = x.bfloat16() @ w64.bfloat16().t() + (2.0 * (x @ a[0].t()) @ b[0].t()).bfloat16()
        _assert_low_precision(y, oracle, torch_bf16, f"y ({backend})")


def _assert_low_precision(out, oracle, torch_same_dtype, name, dtype=torch.bfloat16):
    """tests/tolerances.py's rule (max error <= FACTOR x PyTorch's / PEFT's own + floor x scale) for
    outputs whose dtype is not the compute dtype (fp32 logits of a bf16-compute model)."""
    scale = max(oracle.abs().max().item(), 1e-6)
    err, torch_err = max_err(out, oracle), max_err(torch_same_dtype, oracle)
    bound = LOW_PRECISION_FACTOR * torch_err + LOW_PRECISION_FLOOR[dtype] * scale
    assert err <= bound, f"{name}: error {err:.3g} > {LOW_PRECISION_FACTOR} x PEFT/torch's {torch_err:.3g} (+floor)"


def test_opcheck_and_compile_fullgraph():
    n, k = 32, 64
    qw = _quantise("nf4-dq", torch.randn(n, k) * 0.05)
    a, b = _adapters(k, n, device="cpu")
    x = torch.randn(5, k, requires_grad=True)
    from tunefast.ops import qlora as oq

    args = (x, *oq._q_args(qw), None, torch.bfloat16, None, a, b, [2.0], [0.0], None, "reference")
    torch.library.opcheck(oq._qlora_linear_fwd, args)
    eager = qlora_linear(x, qw, None, a, b, [2.0], backend="reference")
    compiled = torch.compile(lambda x: qlora_linear(x, qw, None, a, b, [2.0], backend="reference"),
                             fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager, rtol=0, atol=0)
    out.sum().backward()
    assert a[0].grad is not None
    # x without grad: the backward needs no dx and passes a storage-less stand-in for the weight
    frozen_x = x.detach()
    grads = []
    for fn in (lambda x: qlora_linear(x, qw, None, a, b, [2.0], backend="reference"), compiled):
        a[0].grad = b[0].grad = None
        fn(frozen_x).sum().backward()
        grads.append((a[0].grad.clone(), b[0].grad.clone()))
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(quant_type="int4"), ValueError, "unsupported quantisation type 'int4'"),
        (dict(quant_type="nf3"), ValueError, "supported.*nf4.*fp4.*int8"),
        (dict(absmax=torch.ones(3)), ValueError, "absmax has 3 entries"),
        (dict(data=torch.zeros(10, 1, dtype=torch.uint8)), ValueError, "holds 10 bytes"),
        (dict(blocksize=0), ValueError, "blocksize must be positive"),
        (dict(shape=(32, 63)), ValueError, "a 32x63 weight packs into 1008"),
        (dict(absmax=torch.ones(32, dtype=torch.float64)), ValueError, "absmax must be float32"),
    ],
)
def test_bad_input(change, exc, match):
    import dataclasses

    qw = dataclasses.replace(_quantise("nf4", torch.randn(32, 64, device="cpu")), **change)
    a, b = _adapters(64, 32, device="cpu")
    with pytest.raises(exc, match=match):
        qlora_linear(torch.randn(4, 64), qw, None, a, b, [1.0])


def test_bad_input_double_quant_and_int8():
    import dataclasses

    qw = _quantise("nf4-dq", torch.randn(32, 64))
    a, b = _adapters(64, 32, device="cpu")
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="double quantisation needs"):
        qlora_linear(x, dataclasses.replace(qw, offset=None), None, a, b, [1.0])
    with pytest.raises(ValueError, match="absmax_code must be the 256-value"):
        qlora_linear(x, dataclasses.replace(qw, absmax_code=torch.zeros(16)), None, a, b, [1.0])
    q8 = _quantise("int8", torch.randn(32, 64))
    with pytest.raises(ValueError, match="SCB"):
        qlora_linear(x, dataclasses.replace(q8, absmax=q8.absmax[:5]), None, a, b, [1.0])
    with pytest.raises(TypeError, match="QuantWeight"):
        qlora_linear(x, torch.randn(32, 64), None, a, b, [1.0])


# ----------------------------------------------------------------------------------------------------
# tunefast.patch on PEFT bitsandbytes LoRA layers (CPU: bitsandbytes' CPU backend)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved once; in_features all multiples of 64 (hidden 64, intermediate 128)."""
    make_config, cls, _ = M.FAMILIES["llama"]
    cfg = make_config()
    cfg.intermediate_size = 128
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    cls(cfg).save_pretrained(path)
    return path


def qlora_model(path, fmt, *, compute=torch.float32, dtype=torch.float32, targets="all-linear", **lora):
    """Load as transformers' BitsAndBytesConfig would, wrap with PEFT (random B), training mode."""
    if fmt == "int8":
        qcfg = tf.BitsAndBytesConfig(load_in_8bit=True)
    else:
        qcfg = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=fmt[:3], bnb_4bit_compute_dtype=compute,
                                     bnb_4bit_use_double_quant=fmt.endswith("-dq"))
    model = M.FAMILIES["llama"][1].from_pretrained(path, quantization_config=qcfg, device_map="cpu", dtype=dtype,
                                                   attn_implementation="eager")
    torch.manual_seed(100)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False, **lora)
    model = peft.get_peft_model(model, cfg)
    model.train()  # from_pretrained returns eval mode; dropout is 0 so both compute the same function
    return model


@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_parity_with_peft(checkpoint, fmt, backend):
    """Logits, loss and every trainable gradient within 1e-5 (relative, norm-wise) of PEFT, fp32."""
    model = qlora_model(checkpoint, fmt)
    patched = M.clone(model)
    report = tunefast.patch(patched, backend=backend)
    assert len(report.patched) == 15 and not report.skipped, str(report)  # 14 QLoRA layers + the fused LM head
    assert all(e.kernel == f"qlora_linear[{backend}]" for e in report.patched if not e.name.endswith("lm_head"))
    assert_parity(model, patched, M.batch("llama"), min_grads=28)


@needs_bnb
def test_report_details(checkpoint):
    model = qlora_model(checkpoint, "nf4-dq", compute=torch.bfloat16, targets=["q_proj", "v_proj"])
    report = tunefast.patch(model)
    assert report.patched[0].detail == "nf4, double-quant, blocksize 64, compute bfloat16; default: r=8", str(report)
    model = qlora_model(checkpoint, "int8", targets=["q_proj"])
    detail = tunefast.patch(model).patched[0].detail
    assert detail.startswith("int8 (row-scaled)") and "LLM.int8()" in detail


@needs_bnb
def test_training_steps_match_peft(checkpoint):
    """nf4 + double quant, lora_bias on, 3 AdamW steps: every step's loss as PEFT's."""
    losses = []
    for patch in (False, True):
        model = qlora_model(checkpoint, "nf4-dq", targets=["q_proj", "down_proj"], lora_bias=True)
        if patch:
            tunefast.patch(model, backend="triton")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        run = []
        inputs = M.batch("llama")
        for step in range(3):
            loss = model(**inputs).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0] - 0.05  # it trains
    for step, (want, got) in enumerate(zip(*losses)):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: {got} vs PEFT {want}"


@needs_bnb
def test_bf16_compute_dtype_within_low_precision_rule(checkpoint):
    """The standard QLoRA recipe: fp32 hidden states, bnb_4bit_compute_dtype=bfloat16. Oracle: the
    same quantised model computed in fp32. Patched error <= 2 x PEFT's error (+ a small floor)."""
    oracle = qlora_model(checkpoint, "nf4-dq")
    peft_bf16 = qlora_model(checkpoint, "nf4-dq", compute=torch.bfloat16)
    patched = M.clone(peft_bf16)
    tunefast.patch(patched, backend="triton")
    inputs = M.batch("llama")
    runs = [M.logits_loss_grads(m, inputs) for m in (oracle, peft_bf16, patched)]
    (lo, so, go), (lp, sp, gp), (lt, st, gt) = runs
    _assert_low_precision(lt, lo, lp, "logits")
    _assert_low_precision(st, so, sp, "loss")
    for name in go:
        _assert_low_precision(gt[name], go[name], gp[name], name)


@needs_bnb
def test_bf16_layer_within_low_precision_rule():
    """A bf16 model (weights quantised from bf16, x and compute bf16, fp32 adapters as PEFT's
    autocast_adapter_dtype makes them): one layer against an fp64 oracle on the same weights."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    with torch.no_grad():
        base.weight.data = (torch.randn(96, 128) * 0.05).bfloat16()
        base.bias.data = (torch.randn(96) * 0.1).bfloat16()
    base = base.to("cpu")  # quantises
    torch.manual_seed(5)
    layer = PeftLinear4bit(base, "default", config=peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False),
                           r=8, lora_alpha=16)
    x = torch.randn(64, 128).bfloat16().requires_grad_()
    a = layer.lora_A["default"].weight
    peft_y = layer(x)
    peft_grads = torch.autograd.grad(peft_y.float().square().sum(), [x, a])
    qw = _from_bnb(base.weight.data, base.weight.quant_state)
    x64 = x.detach().double().requires_grad_()
    a64 = a.detach().double().requires_grad_()
    b64 = layer.lora_B["default"].weight.detach().double()
    oracle = x64 @ rq.dequantize(qw, torch.float64).t() + base.bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    oracle_grads = torch.autograd.grad(oracle.square().sum(), [x64, a64])
    for backend in BACKENDS:
        patched = M.clone(layer)
        tunefast.patch(patched, backend=backend)
        y = patched(x)
        assert y.dtype == peft_y.dtype == torch.bfloat16
        grads = torch.autograd.grad(y.float().square().sum(), [x, patched.lora_A["default"].weight])
        _assert_low_precision(y, oracle, peft_y, f"y ({backend})")
        for g, go, gp, name in zip(grads, oracle_grads, peft_grads, ("dx", "dA")):
            _assert_low_precision(g, go, gp, f"{name} ({backend})")


@needs_bnb
def test_autocast_matches_peft_under_autocast(checkpoint):
    model = qlora_model(checkpoint, "nf4", targets=["q_proj", "v_proj", "gate_proj"])
    patched = M.clone(model)
    tunefast.patch(patched)
    inputs = M.batch("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(**inputs)
        got = patched(**inputs)
    assert got.logits.dtype == want.logits.dtype
    torch.testing.assert_close(got.logits.float(), want.logits.float(), rtol=0.05, atol=0.05)


@needs_bnb
def test_fallbacks_keep_peft_behaviour(checkpoint):
    """8-bit in eval mode (LLM.int8()), merged, disabled adapters and mixed-adapter batches run PEFT."""
    inputs = M.batch("llama")
    model = qlora_model(checkpoint, "int8", targets=["q_proj", "v_proj"])
    patched = M.clone(model)
    tunefast.patch(patched)
    model.eval(), patched.eval()
    with torch.no_grad():
        assert torch.equal(patched(**inputs).logits, model(**inputs).logits)

    model = qlora_model(checkpoint, "nf4", targets=["q_proj", "v_proj"])
    model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    # merged before patching: reported, PEFT's forward runs; the fused path resumes after unmerge.
    # (4-bit merging re-quantises W + BA, so the reference goes through the same merge and unmerge.)
    reference = M.clone(model)
    reference.merge_adapter()
    merged = M.clone(reference)
    report = tunefast.patch(merged)
    assert report.skipped and all("merged" in e.reason for e in report.skipped)
    with torch.no_grad():
        assert torch.equal(merged(**inputs).logits, reference(**inputs).logits)
    reference.unmerge_adapter(), merged.unmerge_adapter()
    assert_parity(reference, merged, inputs)

    patched = M.clone(model)
    tunefast.patch(patched)
    with model.disable_adapter(), patched.disable_adapter():
        assert torch.equal(patched(**inputs).logits, model(**inputs).logits)
    model.eval(), patched.eval()  # PEFT allows adapter_names only in eval mode
    ids = inputs["input_ids"]
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids, adapter_names=["default", "other"]).logits,
                           model(input_ids=ids, adapter_names=["default", "other"]).logits)


@needs_bnb
def test_skips_with_reasons(checkpoint):
    model = qlora_model(checkpoint, "nf4", targets=["q_proj", "v_proj"], use_dora=True)
    report = tunefast.patch(model)
    assert [e.name for e in report.patched] == ["base_model.model.lm_head"]  # only the fused LM head
    assert all("DoraLinearVariant" in e.reason for e in report.skipped)

    model = qlora_model(checkpoint, "nf4", targets=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.get_base_layer().weight.quant_state.quant_type = "int4"  # what a future format would look like
    report = tunefast.patch(model)
    assert "unsupported 4-bit quantisation type 'int4'" in report.skipped[0].reason
    assert len(report.patched) == 2  # the other q_proj + the fused LM head

    model = qlora_model(checkpoint, "nf4", targets=["q_proj"])
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.get_base_layer().weight.quant_state.packing_format_for_cpu = True
    report = tunefast.patch(model)
    assert "repacked" in report.skipped[0].reason


@needs_bnb
def test_unpatch_restores_classes_and_outputs(checkpoint):
    model = qlora_model(checkpoint, "fp4", targets=["q_proj", "o_proj"])
    inputs = M.batch("llama")
    with torch.no_grad():
        before = model(**inputs).logits
    classes = {n: type(m) for n, m in model.named_modules()}
    tunefast.patch(model)
    tunefast.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)


# ----------------------------------------------------------------------------------------------------
# GPU (benchmarks/gpu_check.sh runs these): compiled Triton, not the interpreter
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_dequantize_bit_exact_and_op(fmt):
    """Compiled Triton dequantisation == the CPU reference bit for bit (bf16 rounding, no FMA in the
    double-quant absmax), bitsandbytes' CUDA dequantisation when installed, and the op == the dense
    LoRA op on the dequantised weight."""
    g = torch.Generator().manual_seed(0)
    qw_cpu = _quantise(fmt, torch.randn(300, 512, generator=g) * 0.05)
    qw = qw_cpu.to("cuda")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(_triton_dequantize(qw, dtype).cpu(), rq.dequantize(qw_cpu, dtype)), dtype
    assert torch.equal(_triton_dequantize(qw, torch.float32, [torch.bfloat16]).cpu(),
                       rq.dequantize(qw_cpu, torch.float32, [torch.bfloat16]))
    if bnb is not None and fmt != "int8":
        from bitsandbytes.functional import QuantState

        state2 = QuantState(absmax=qw.absmax_scale, code=qw.absmax_code, blocksize=qw.absmax_blocksize,
                            dtype=torch.float32) if qw.nested else None
        qs = QuantState(absmax=qw.absmax, shape=torch.Size(qw.shape), code=rq.code(qw.quant_type, "cuda"),
                        blocksize=qw.blocksize, quant_type=qw.quant_type, dtype=torch.bfloat16,
                        offset=qw.offset, state2=state2)
        assert torch.equal(_triton_dequantize(qw, torch.bfloat16), bnbF.dequantize_4bit(qw.data, qs))
    a, b = _adapters(512, 300, dtype=torch.bfloat16)
    x = torch.randn(4, 333, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    outs = []
    for fn, w in ((qlora_linear, qw), (tunefast.lora_linear, rq.dequantize(qw, torch.bfloat16))):
        torch.manual_seed(7)
        y = fn(x, w, None, a, b, [2.0], [0.1], backend="triton")
        outs.append((y, *torch.autograd.grad(y.float().square().sum(), [x, *a, *b])))
    for got, want in zip(*outs):
        assert torch.equal(got, want)


@needs_bnb
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_with_trainable_bias_lora_bias_and_bf16_storage(backend):
    """One fp32 layer: trainable base bias, PEFT lora_bias, packed data stored as bf16 (bitsandbytes'
    quant_storage for FSDP): output and every gradient (x, A, B, B's bias, base bias) as PEFT's."""
    from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

    base = bnb.nn.Linear4bit(128, 80, bias=True, compute_dtype=torch.float32, quant_type="fp4",
                             compress_statistics=True, quant_storage=torch.bfloat16)
    with torch.no_grad():
        base.weight.data = torch.randn(80, 128) * 0.05
        base.bias.data = torch.randn(80) * 0.1
    base = base.to("cpu")
    assert base.weight.data.dtype == torch.bfloat16
    torch.manual_seed(5)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, init_lora_weights=False, lora_bias=True)
    layer = PeftLinear4bit(base, "default", config=cfg, r=8, lora_alpha=16, lora_bias=True)
    torch.nn.init.normal_(layer.lora_B["default"].bias)
    patched = M.clone(layer)
    assert tunefast.patch(patched, backend=backend).patched
    x = torch.randn(3, 7, 128)
    results = []
    for m in (layer, patched):
        xi = x.clone().requires_grad_()
        y = m(xi)
        params = [m.lora_A["default"].weight, m.lora_B["default"].weight, m.lora_B["default"].bias,
                  m.get_base_layer().bias]
        results.append((y, *torch.autograd.grad(y.square().sum(), [xi, *params])))
    for name, got, want in zip(("y", "dx", "dA", "dB", "dB_bias", "dbias"), results[1], results[0]):
        assert_rel_close(got, want, name)
