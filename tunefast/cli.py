"""The ``tunefast`` command: ``tunefast demo`` (the main job) and ``tunefast info``."""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; fail fast instead of hanging
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="tunefast", description="fused kernels for PEFT fine-tuning")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions and which backends are usable here (and why not)")
    from . import demo

    demo.add_arguments(sub.add_parser("demo", help="fine-tune a small model with PEFT LoRA, unpatched vs patched"))
    args = p.parse_args(argv)
    if args.command == "info":
        from . import info

        return info.main()
    return demo.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
