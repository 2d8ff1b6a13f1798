"""Memory-saving side tuning: a small side network trained on the hidden states of a frozen backbone
that runs without autograd (Ladder Side-Tuning, Sung et al. 2022; UniPT, Diao et al. 2024).

    from tunefast.methods import side
    side_model = side.apply(model, side.SideConfig(reduction_factor=8, merge="ladder"))
    opt = torch.optim.AdamW(side_model.trainable_parameters(), lr=3e-4)
    side_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    side.save(side_model, "out/");  side_model = side.load(model, "out/")

Files: config.py (SideConfig), network.py (ladder / UniPT side networks), heads.py (causal-LM,
classification and feature heads), model.py (apply, SideModel), io.py (save, load). The fused ops are
in tunefast/ops/side.py, their Triton kernels in kernels/side.py, the plain-PyTorch math in
tunefast/reference/side.py.
"""

from .config import SideConfig
from .io import load, save
from .model import SideModel, apply

__all__ = ["SideConfig", "SideModel", "apply", "load", "save"]
