"""The Hugging Face Trainer path: a patched PEFT LoRA model trains with PEFT's losses, evaluates, saves
a checkpoint and resumes from it."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

import tunefast
from tests import models as M
from tunefast.integrations import TunefastCallback


class _Progressions(torch.utils.data.Dataset):
    def __init__(self, n=24, seq=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = (torch.randint(0, M.VOCAB, (n, 1), generator=g)
                    + torch.randint(1, 4, (n, 1), generator=g) * torch.arange(seq)) % M.VOCAB

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _run(out, patch, resume=None):
    model = M.peft_model("llama", ["q_proj", "v_proj", "up_proj"], dropout=0.0)
    args = TrainingArguments(
        output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=3, report_to=[],
        use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0,
    )
    callback = TunefastCallback(backend="reference")
    trainer = Trainer(model=model, args=args, train_dataset=_Progressions(), eval_dataset=_Progressions(8, seed=1),
                      callbacks=[callback] if patch else [])
    trainer.train(resume_from_checkpoint=resume)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return losses, trainer.evaluate()["eval_loss"], callback.report, model


def test_trainer_trains_evaluates_saves_and_resumes(tmp_path):
    want, want_eval, _, _ = _run(tmp_path / "peft", patch=False)
    got, got_eval, report, model = _run(tmp_path / "tunefast", patch=True)
    assert report is not None and len(report.patched) == 7 and tunefast.get_report(model) is report  # 6 LoRA + the head
    assert sorted(got) == list(range(1, 7))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-4), (step, got, want)
    assert want[6] < want[1]
    assert got_eval == pytest.approx(want_eval, rel=1e-5)
    # resume the patched run from its step-3 checkpoint: steps 4..6 repeat the uninterrupted run
    resumed, _, _, _ = _run(tmp_path / "tunefast", patch=True, resume=str(tmp_path / "tunefast" / "checkpoint-3"))
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(got[step], rel=1e-4, abs=1e-4)


def test_callback_bad_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        TunefastCallback(backend="gpu")
