"""tunefast's Triton kernels, installed as ``tunefast.kernels``.

Never importable as a top-level ``kernels``: that is a Hugging Face package name that transformers and
bitsandbytes probe for, and running from the repository root puts this folder on ``sys.path``.
"""

if __name__ == "kernels":
    raise ImportError(
        "this 'kernels' folder is tunefast's Triton kernels (import tunefast.kernels), not the Hugging Face "
        "'kernels' package"
    )
