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
    out = _run("demo", "--model", "llama", "--steps", "4", "--batch", "4")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "loss curves: max |diff|" in out.stdout
    diff = float(out.stdout.split("max |diff| = ")[1].split()[0])
    assert diff < 1e-4
    assert "activation bytes kept for backward" in out.stdout


@pytest.mark.parametrize("args,msg", [(["demo", "--steps", "0"], "--steps"), (["demo", "--model", "gpt9"], "invalid choice")])
def test_demo_bad_arguments(args, msg):
    out = _run(*args)
    assert out.returncode != 0 and msg in out.stderr
