"""Output heads of a side model. Every head starts from x = last_hidden_state + up(s), with ``up``
(N -> D) zero-initialised, so an untrained side model returns exactly the backbone's own features.

  CausalLMHead        logits = frozen backbone LM head (x); loss = Hugging Face's shifted cross-entropy
                      (ignore_index -100, mean over scored tokens or sum / num_items_in_batch).
                      Fused and training (grad enabled, labels given): tunefast.ops.side.side_lm_loss
                      (the fused LM-head loss, tunefast.ops.linear_cross_entropy, chained into ``up``);
                      logits are not formed for backward and are returned as None, as Liger does.
  ClassificationHead  logits = trainable Linear(D, num_labels) on pool(x); HF's loss by problem_type.
  FeaturesHead        last_hidden_state = x, pooler_output = pool(x).

Pooling is linear, so pool(x) = pool(last_hidden_state) + up(pool(s)): no (tokens x D) tensor is formed
for the classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import (
    BaseModelOutputWithPooling,
    CausalLMOutputWithPast,
    ImageClassifierOutput,
    SequenceClassifierOutput,
)

from ...ops import side as side_ops
from ...reference.side import IGNORE_INDEX, shifted_targets


def pool(x: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """(B, T, C) -> (B, C). ``mask`` (B, T): 1 for real tokens (any padding side) or None."""
    if kind == "first":
        return x[:, 0]
    if mask is None:
        return x[:, -1] if kind == "last" else x.mean(1)
    mask = mask.to(x.device)
    if kind == "last":
        positions = torch.arange(x.shape[1], device=x.device)
        last = (mask.long() * positions).argmax(1)
        return x[torch.arange(x.shape[0], device=x.device), last]
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1)


def _zero_up(width, hidden, dtype, device):
    up = nn.Linear(width, hidden, dtype=dtype, device=device)
    nn.init.zeros_(up.weight)
    nn.init.zeros_(up.bias)
    return up


def causal_lm_loss(logits, labels, num_items_in_batch=None):
    """Hugging Face's ForCausalLMLoss: fp32 logits, labels shifted left, -100 ignored."""
    targets = shifted_targets(labels.to(logits.device)).reshape(-1)
    logits = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum") / num_items_in_batch


class CausalLMHead(nn.Module):
    def __init__(self, width, hidden, config, dtype, device):
        super().__init__()
        self.up = _zero_up(width, hidden, dtype, device)
        self._chunk = config.loss_chunk_tokens
        self._backend = config.backend

    def forward(self, s, last, lm_head, labels, num_items_in_batch, fused, **_):
        if labels is not None and fused and torch.is_grad_enabled():
            targets = shifted_targets(labels.to(s.device)).reshape(-1)
            loss_sum = side_ops.side_lm_loss(
                s.reshape(-1, s.shape[-1]), self.up.weight, self.up.bias, last.reshape(-1, last.shape[-1]),
                lm_head.weight, lm_head.bias, targets, chunk_rows=self._chunk, backend=self._backend,
            )
            denom = num_items_in_batch if num_items_in_batch is not None else (targets != IGNORE_INDEX).sum()
            return CausalLMOutputWithPast(loss=loss_sum / denom, logits=None)
        x = last + self.up(s)
        logits = lm_head(x.to(lm_head.weight.dtype))
        loss = causal_lm_loss(logits, labels, num_items_in_batch) if labels is not None else None
        return CausalLMOutputWithPast(loss=loss, logits=logits)


class ClassificationHead(nn.Module):
    def __init__(self, width, hidden, config, dtype, device, num_labels, problem_type, image):
        super().__init__()
        self.up = _zero_up(width, hidden, dtype, device)
        self.classifier = nn.Linear(hidden, num_labels, dtype=dtype, device=device)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self._pooling, self._problem_type = config.pooling, problem_type
        self._output = ImageClassifierOutput if image else SequenceClassifierOutput

    def forward(self, s, last, labels, mask, **_):
        feats = pool(last, mask, self._pooling).to(s.dtype) + self.up(pool(s, mask, self._pooling))
        logits = self.classifier(feats)
        loss = classification_loss(logits, labels, self._problem_type) if labels is not None else None
        return self._output(loss=loss, logits=logits)


class FeaturesHead(nn.Module):
    def __init__(self, width, hidden, config, dtype, device):
        super().__init__()
        self.up = _zero_up(width, hidden, dtype, device)
        self._pooling = config.pooling

    def forward(self, s, last, mask, **_):
        pooled = pool(last, mask, self._pooling).to(s.dtype) + self.up(pool(s, mask, self._pooling))
        return BaseModelOutputWithPooling(last_hidden_state=last + self.up(s), pooler_output=pooled)


def classification_loss(logits, labels, problem_type=None):
    """Hugging Face's sequence-classification loss: regression (1 label, MSE), single-label (CE) or
    multi-label (BCE with logits), inferred from num_labels and the labels' dtype when not given."""
    labels = labels.to(logits.device)
    n = logits.shape[-1]
    if problem_type is None:
        if n == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        return F.mse_loss((logits.squeeze(-1) if n == 1 else logits).float(), labels.float())
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.float().view(-1, n), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
