"""pytest glue for the benchmarks: collects ``bench_*.py`` and measures each case through harness.py.

    python -m pytest benchmarks -p no:cacheprovider --benchmark-enable   # measure; write results
    python -m pytest benchmarks -p no:cacheprovider                      # smoke: one step per variant

pyproject's addopts hold ``--benchmark-disable`` (pytest-benchmark's switch), so a plain run is a smoke
run: every variant is set up, checked against the baseline and run for a few untimed steps (one under
the saved-tensor hooks, which gives act_bytes); nothing is timed and nothing is written unless
``--bench-out`` is given. ``--benchmark-enable`` times the cases (harness.py), appends rows to
``--bench-out`` (default ``.benchmarks/tunefast/``, git-ignored) and prints the summary.

pytest-benchmark's reporting options apply to the harness's samples (``--benchmark-json``,
``--benchmark-autosave``, ``--benchmark-compare``, ``--benchmark-histogram``): each test replays its
variant's measured per-step times into the ``benchmark`` fixture. Its calibration options
(``--benchmark-min-rounds``, ``--benchmark-timer``, ...) do not: the harness times.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks import harness

_STATE = pytest.StashKey["_BenchState"]()


def pytest_addoption(parser):
    group = parser.getgroup("tunefast benchmarks")
    group.addoption("--bench-out", default=None,
                    help="folder for results.jsonl, results.csv and summary.md (appended; default "
                         ".benchmarks/tunefast with --benchmark-enable, nothing written without)")
    group.addoption("--bench-device", default=None, choices=["cpu", "cuda"],
                    help=f"device to build the cases for (default: ${harness.DEVICE_ENV}, else cuda if available)")
    group.addoption("--bench-time", type=float, default=None,
                    help="timed seconds per case, all variants together (default 4 on CPU, 2 on CUDA)")
    group.addoption("--bench-threads", type=int, default=None,
                    help="torch.set_num_threads for CPU runs (default: torch's). On a CPU shared with other "
                         "work, 1 avoids OpenMP threads spinning at barriers while their partner is descheduled")


def pytest_configure(config):
    # Before the bench modules are imported: they build their case lists for harness.bench_device().
    if config.getoption("--bench-device"):
        os.environ[harness.DEVICE_ENV] = config.getoption("--bench-device")
    if config.getoption("--bench-threads"):
        import torch

        torch.set_num_threads(config.getoption("--bench-threads"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    config.stash[_STATE] = _BenchState(config)


def pytest_collect_file(file_path: Path, parent):
    # A file named on the command line is collected by pytest itself, whatever its name.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


class _BenchState:
    """Per-session: one measurement per case (shared by its variants' tests) and the recorder."""

    def __init__(self, config):
        self.config = config
        self.results: dict[tuple[str, str], harness.CaseResult | BaseException] = {}
        self.recorder: harness.Recorder | None = None

    def result(self, case: harness.Case, timing: bool) -> harness.CaseResult:
        key = (case.suite, case.id)
        if key not in self.results:
            settings = harness.Settings.for_device(harness.bench_device(), timing=timing,
                                                   target_s=self.config.getoption("--bench-time"))
            try:
                self.results[key] = harness.measure_case(case, settings)
            except BaseException as e:  # the case's other variants report the same failure
                self.results[key] = e
                raise
            self._record(self.results[key], timing)
        got = self.results[key]
        if isinstance(got, BaseException):
            raise RuntimeError(f"measuring {case!r} failed in an earlier test: {got!r}") from got
        return got

    def _record(self, result: harness.CaseResult, timing: bool) -> None:
        out = self.config.getoption("--bench-out")
        if out is None and not timing:
            return
        if self.recorder is None:
            self.recorder = harness.Recorder(out or harness.ROOT / ".benchmarks" / "tunefast")
        self.recorder.add(result.rows.values())


def _replay(benchmark, samples: list[float]) -> None:
    """Hand the harness's per-step times to pytest-benchmark's statistics and reports.

    Caution: sets the fixture's private ``_timer`` (pytest-benchmark 4 and 5) to a clock that each
    replayed call advances by one sample. If that attribute goes away, only extra_info is reported.
    """
    if not hasattr(benchmark, "_timer"):
        benchmark.extra_info["replay"] = "unsupported pytest-benchmark version: times are in extra_info only"
        benchmark.pedantic(lambda: None, rounds=1)
        return
    clock = [0.0]
    pending = iter(samples)

    def advance():
        clock[0] += next(pending)

    benchmark._timer = lambda: clock[0]
    benchmark.pedantic(advance, rounds=len(samples), iterations=1, warmup_rounds=0)


_EXTRA_INFO = ("time_ms", "time_ratio", "cpu_ms", "cpu_ratio", "act_bytes", "act_ratio", "peak_bytes",
               "peak_ratio", "tflops", "frac_peak", "max_rel_err", "device", "commit")


@pytest.fixture
def measure(request, benchmark):
    """``measure(case, variant)``: measure ``case`` (all variants, once per session) and report
    ``variant``'s row, which it returns; fails if the variant's max_rel_err exceeds case.tolerance."""
    state: _BenchState = request.config.stash[_STATE]

    def run(case: harness.Case, variant: str) -> dict:
        from tunefast import backend

        if backend.interpreter_on():
            pytest.skip("TRITON_INTERPRET=1 is set (tests/conftest.py sets it): run benchmarks in their own "
                        "pytest process, without the Triton interpreter")
        timing = not benchmark.disabled
        result = state.result(case, timing)
        row = result.rows[variant]
        benchmark.group = f"{case.suite}: {case.id}"
        benchmark.extra_info.update({k: row[k] for k in _EXTRA_INFO})
        benchmark.extra_info.update(row["info"])
        if timing and result.samples.get(variant):
            _replay(benchmark, result.samples[variant])
        else:
            benchmark.pedantic(lambda: None)  # disabled: runs it once; marks the fixture as used
        if case.tolerance is not None and variant != case.baseline:
            err = row["max_rel_err"]
            assert err is not None and err <= case.tolerance, (
                f"{variant} differs from {case.baseline}: max relative error {err} > {case.tolerance}")
        return row

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    state: _BenchState = config.stash.get(_STATE, None)
    if state is None or state.recorder is None or not state.recorder.rows:
        return
    terminalreporter.write_sep("=", "tunefast benchmark summary")
    terminalreporter.write(harness.summary_markdown(state.recorder.rows))
    terminalreporter.write_line(f"results appended to {state.recorder.out}/results.jsonl and results.csv; "
                                f"summary in {state.recorder.out}/summary.md")
