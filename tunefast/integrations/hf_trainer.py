"""One-line opt-in for ``transformers.Trainer`` (and TRL's trainers, which subclass it).

    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[TunefastCallback()])

The callback patches the model at the end of ``Trainer.__init__``, before the Trainer (or accelerate)
wraps it for DDP / FSDP, which is the order tunefast supports; the patch report is kept on the callback
(``callback.report``) and logged once. Calling ``tunefast.patch(model)`` yourself before building the
Trainer is equivalent.
"""

from __future__ import annotations

import logging

from transformers import TrainerCallback

logger = logging.getLogger("tunefast")


class TunefastCallback(TrainerCallback):
    """Patch the Trainer's model with :func:`tunefast.patch` (``backend`` as there)."""

    def __init__(self, backend: str = "auto"):
        from ..backend import check_backend_name

        self.backend = check_backend_name(backend)
        self.report = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        from .. import patch

        if model is None:
            raise ValueError("TunefastCallback: the Trainer passed no model; construct the Trainer with model=...")
        self.report = patch(model, backend=self.backend)
        logger.info("%s", self.report)
        return control
