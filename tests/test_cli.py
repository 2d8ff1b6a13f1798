"""The command line: `tunefast info` and a short `tunefast demo` run end to end."""

import subprocess
import sys

import pytest


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tunefast", *args], capture_output=True, text=True, timeout=timeout)


def test_info_reports_backends_and_reasons():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for needle in ("torch", "triton", "peft", "native CPU kernels", "GPU present", "why not", "backend='auto' runs"):
        assert needle in text, needle


def test_demo_llama_runs_and_curves_agree():
    out = _run("demo", "--model", "llama", "--steps", "4", "--batch", "4", "--dropout", "0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loss curves: max |diff|" in out.stdout
    diff = float(out.stdout.split("max |diff| = ")[1].split()[0])
    assert diff < 1e-4
    assert "activation bytes kept for backward" in out.stdout


def test_demo_default_dropout_shows_the_memory_saving_and_exactness():
    """The default run uses lora_dropout=0.1 (what PEFT users set): fewer bytes kept, and the same numbers
    as PEFT once dropout is off."""
    out = _run("demo", "--model", "llama", "--steps", "2", "--batch", "2", "--backend", "reference")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "lora_dropout=0.1" in out.stdout
    ratio = float(out.stdout.split("activation bytes kept for backward:")[1].split("->")[1].split("x")[0])
    assert ratio < 0.9
    exact = float(out.stdout.split("one step's loss differs from PEFT's by ")[1].split()[0])
    assert exact < 1e-5


@pytest.mark.parametrize("args,msg", [
    (["demo", "--steps", "0"], "--steps"), (["demo", "--model", "gpt9"], "invalid choice"),
    (["demo", "--backend", "banana"], "invalid choice"), (["demo", "--lr", "nan"], "--lr"),
    (["demo", "--lr", "-1"], "--lr"), (["demo", "--steps", "x"], "invalid int value"),
])
def test_demo_bad_arguments(args, msg):
    out = _run(*args)
    assert out.returncode == 2 and msg in out.stderr and "Traceback" not in out.stderr, out.stderr[-1000:]
