"""tunefast: fused kernels for parameter-efficient fine-tuning (placeholder while the package is assembled)."""
__version__ = "0.1.0"
