"""Moved to kernels/launch.py (``launch.autotune_enabled``, ``launch.set_autotune``). This alias stays
only until kernels/prefix_attention.py, its last importer, launches through kernels/launch.py."""

from .launch import autotune_enabled  # noqa: F401
