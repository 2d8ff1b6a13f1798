"""Integrations with training frameworks (Hugging Face Trainer / TRL)."""

from .hf_trainer import TunefastCallback

__all__ = ["TunefastCallback"]
