"""The frozen target as the heads' teacher: its last hidden state and logits (or argmax) on a batch, and a memo of
them per distinct row for training that repeats its rows (``memo_features=true``)."""
from __future__ import annotations

import torch


@torch.no_grad()
def teacher(target, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target on ``batch [B, T]``: last hidden state ``[B, T, H]`` and logits ``[B, T, V]`` (float32)."""
    out = target(input_ids=batch, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float()


@torch.no_grad()
def argmax_teacher(target, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target on ``batch [B, T]``: last hidden state ``[B, T, H]`` (float32) and argmax ``[B, T]``."""
    hidden, logits = teacher(target, batch)
    return hidden, logits.argmax(-1)


class MemoTeacher:
    """:func:`argmax_teacher` computed once per distinct row and kept in memory (``memo_features=true``).

    When the training rows repeat (several epochs over the target's own answers), every later step trains the
    heads alone: the target's forward, most of a step's cost, runs once per row. The values are the same as
    without the memo (the same forward on the same row). Memory: ``T * (H + 1) * 4`` bytes per distinct row.
    """

    def __init__(self):
        self.rows: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, target, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = [row.numpy().tobytes() for row in batch.cpu()]
        new = [i for i, key in enumerate(keys) if key not in self.rows]
        if new:
            hidden, labels = argmax_teacher(target, batch[new])  # [b, T, H], [b, T]
            for j, i in enumerate(new):
                self.rows[keys[i]] = (hidden[j], labels[j])
        hidden, labels = zip(*(self.rows[key] for key in keys))
        return torch.stack(hidden), torch.stack(labels)  # [B, T, H], [B, T]
