"""Memory-saving side tuning: a small side network trained on the hidden states of a frozen backbone
that runs without autograd (Ladder Side-Tuning, Sung et al. 2022; UniPT, Diao et al. 2024).

    from tunefast.methods import side
    side_model = side.apply(model, side.SideConfig(reduction_factor=8, merge="ladder"))
    opt = torch.optim.AdamW(side.trainable_parameters(side_model), lr=3e-4)
    side_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    side.save(side_model, "out/");  side_model = side.load(fresh_model, "out/")
    print(side.report(side_model))                      # each rung with its kernel
    model = side.remove(side_model)                     # the model as it was given (flags, train/eval)

``apply`` returns a new model (a SideModel around the one given): always use the returned model
(tunefast/methods/protocol.py).

Files: config.py (SideConfig), network.py (ladder / UniPT side networks), heads.py (causal-LM,
classification and feature heads), model.py (apply, SideModel), io.py (save, load). The fused ops are
in tunefast/ops/side.py, their Triton kernels in kernels/side.py, the plain-PyTorch math in
tunefast/reference/side.py.
"""

from .config import SideConfig
from .io import load, save
from .model import SideModel, apply, remove, report, trainable_parameters

Config = SideConfig  # the method protocol's name (tunefast/methods/protocol.py)

__all__ = ["Config", "SideConfig", "SideModel", "apply", "load", "remove", "report", "save", "trainable_parameters"]
