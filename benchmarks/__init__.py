"""tunefast benchmarks: one harness (harness.py), one bench_<method>.py per method; see README.md."""
