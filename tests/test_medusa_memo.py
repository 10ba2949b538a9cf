"""Medusa training on repeated rows: the compact hard loss, the feature memo and warm starts.

- :func:`hard_loss` (draft-vocabulary columns only, labels given) equals cross-entropy on the heads' full
  ``[K, B, T, V]`` logits, and its gradients are the same.
- :class:`MemoTeacher` returns exactly what the target computes, runs the target once per distinct row, and a
  training run with ``memo_features=true`` ends with the same heads as one without it.
- ``init_from`` continues from trained heads (their draft vocabulary with them); heads of another shape or
  target are one ConfigError.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from drafters.draft_vocab import expressible
from drafters.medusa_heads import MedusaHeads, load_heads, save_heads
from experiments.head_teachers import MemoTeacher, argmax_teacher
from experiments.medusa_training import hard_loss
from specdec.errors import ConfigError
from tests.test_medusa import MICRO_TRAIN, compose_train
from tests.tiny_models import pair

SMALL = [o for o in MICRO_TRAIN if o.startswith(("zoo_size=", "logger=", "progress=", "threads="))]
SMALL += ["loss=hard", "steps=6", "batch_size=2", "context=32", "train_chars=40000", "eval_tokens=256",
          "eval_generated_rows=0", "num_heads=2", "generated_rows=3", "generated_prompt=8", "generated_fraction=1.0",
          "lr=0.003"]


@pytest.mark.parametrize("draft_vocab", [0, 40])
def test_hard_loss_equals_the_full_logits_formula(draft_vocab):
    target = pair("llama")[0]
    vocab = target.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(vocab, generator=gen)[:draft_vocab].sort().values if draft_vocab else None  # [Vd]
    heads = MedusaHeads.for_target(target, 3, init="random", draft_vocab=ids)
    hidden = torch.randn(2, 12, heads.hidden_size, generator=gen)  # [B, T, H]
    t_logits = torch.randn(2, 12, vocab, generator=gen)  # [B, T, V]
    if ids is not None:  # some labels inside the draft vocabulary, some outside (skipped by both)
        t_logits[0, ::2, ids[::3]] += 20.0
    loss, per_head = hard_loss(heads, hidden, t_logits.argmax(-1), 0.8)
    grads = torch.autograd.grad(loss, list(heads.parameters()), allow_unused=True)
    full, full_per_head = _full_logits_hard_loss(heads(hidden), t_logits, 0.8)
    full_grads = torch.autograd.grad(full, list(heads.parameters()), allow_unused=True)
    assert torch.allclose(loss, full, atol=1e-5) and torch.isfinite(loss)
    assert torch.allclose(torch.stack(per_head), torch.stack(full_per_head), atol=1e-5)
    for g, h in zip(grads, full_grads):
        assert (g is None) == (h is None) and (g is None or torch.allclose(g, h, atol=1e-5))


def _full_logits_hard_loss(head_logits, t_logits, decay):
    """The reference: cross-entropy of the heads' full ``[K, B, T, V]`` logits (``-inf`` outside a draft vocabulary)
    on the target's argmax, labels the heads cannot express skipped."""
    per_head = []
    for i in range(head_logits.shape[0]):
        logq = F.log_softmax(head_logits[i, :, : t_logits.shape[1] - i - 1], dim=-1)  # [B, n, V]
        labels = expressible(logq, t_logits[:, i + 1 :].argmax(-1))  # [B, n]
        per_head.append(F.nll_loss(logq.reshape(-1, logq.shape[-1]), labels.reshape(-1)))
    return sum(decay**i * x for i, x in enumerate(per_head)), [x.detach() for x in per_head]


def test_memo_teacher_is_the_target_and_runs_it_once_per_row(monkeypatch):
    from experiments import head_teachers

    target = pair("llama")[0]
    rows = torch.randint(0, target.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))  # [3, T]
    calls = []
    real = head_teachers.teacher
    monkeypatch.setattr(head_teachers, "teacher", lambda t, b: calls.append(b.shape[0]) or real(t, b))
    memo = MemoTeacher()
    first = memo(target, rows[:2])
    again = memo(target, rows[[1, 2, 0]])  # rows 1 and 0 are memoised: only row 2 runs
    assert calls == [2, 1]
    hidden, labels = argmax_teacher(target, rows)
    assert torch.equal(first[0], hidden[:2]) and torch.equal(first[1], labels[:2])
    assert torch.allclose(again[0], hidden[[1, 2, 0]], atol=1e-6) and torch.equal(again[1], labels[[1, 2, 0]])


def test_memo_features_train_the_same_heads(tmp_path, monkeypatch):
    """The same heads as without the memo, from fewer target forwards (the rows repeat: 6 steps of 2 rows over
    the target's answers to 3 prompts)."""
    from experiments import head_teachers
    from experiments.train_medusa import train

    rows, real, run = {"plain": 0, "memo": 0}, head_teachers.teacher, ["plain"]

    def counted(target, batch):  # the target's forwards, in rows
        rows[run[0]] += batch.shape[0]
        return real(target, batch)

    monkeypatch.setattr(head_teachers, "teacher", counted)
    train(compose_train(*SMALL, f"out_dir={tmp_path / 'plain'}"), tmp_path / "r1")
    run[0] = "memo"
    train(compose_train(*SMALL, "memo_features=true", f"out_dir={tmp_path / 'memo'}"), tmp_path / "r2")
    assert 0 < rows["memo"] < rows["plain"], rows
    plain, memo = load_heads(tmp_path / "plain"), load_heads(tmp_path / "memo")
    for (name, a), b in zip(plain.state_dict().items(), memo.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), name


def test_memo_features_need_the_hard_loss(tmp_path):
    from experiments.train_medusa import train

    with pytest.raises(ConfigError, match="loss=hard"):
        train(compose_train(*SMALL, "loss=soft", "memo_features=true", f"out_dir={tmp_path}"), tmp_path / "r")


def test_init_from_continues_from_trained_heads(tmp_path):
    """``init_from``: training starts from the trained heads (with a learning rate of 1e-9 it ends where they were),
    not from a new head's zero blocks, and keeps their draft vocabulary."""
    from experiments.train_medusa import train

    first = [*SMALL, "draft_vocab=64"]
    train(compose_train(*first, f"out_dir={tmp_path / 'a'}"), tmp_path / "r1")
    trained = load_heads(tmp_path / "a")
    report = train(compose_train(*first, "steps=2", "lr=1e-9", f"init_from={tmp_path / 'a'}",
                                 f"out_dir={tmp_path / 'b'}"), tmp_path / "r2")
    again = load_heads(tmp_path / "b")
    assert torch.equal(again.heads[0].lm_head.ids, trained.heads[0].lm_head.ids)  # its draft vocabulary
    assert len(report["per_head"]) == 2
    weight = trained.heads[0].blocks[0].linear.weight  # [H, H]
    assert weight.abs().max() > 1e-3  # trained away from a new head's zero blocks
    torch.testing.assert_close(again.heads[0].blocks[0].linear.weight, weight, atol=1e-6, rtol=0)
    assert MedusaHeads.for_target(pair("llama")[0], 2).heads[0].blocks[0].linear.weight.abs().max() == 0


def test_init_from_heads_of_another_shape_or_target_fail(tmp_path):
    from experiments.train_medusa import train

    other = save_heads(MedusaHeads.for_target(pair("llama")[0], 2), tmp_path / "other")  # not the micro target
    with pytest.raises(ConfigError, match=r"init_from=.*trained for another target|init_from=.*another"):
        train(compose_train(*SMALL, f"init_from={other}", f"out_dir={tmp_path / 'x'}"), tmp_path / "r1")
    train(compose_train(*SMALL, f"out_dir={tmp_path / 'a'}"), tmp_path / "r2")
    with pytest.raises(ConfigError, match=r"num_heads.*asks for"):
        train(compose_train(*SMALL, "num_heads=3", f"init_from={tmp_path / 'a'}", f"out_dir={tmp_path / 'y'}"),
              tmp_path / "r3")


def test_init_from_heads_of_another_model_fail_before_any_rows_are_made(tmp_path, monkeypatch):
    """A trial's init_from of SmolLM2's heads for the micro target generated rows for minutes before the error, and
    the error told to pass other heads as drafter.heads: it comes before any data is made and names init_from."""
    from experiments import head_training
    from experiments.train_medusa import train

    def no_rows(*args, **kwargs):
        raise AssertionError("rows were generated before init_from was checked")

    monkeypatch.setattr(head_training, "generated_training_rows", no_rows)
    other = save_heads(MedusaHeads.for_target(pair("llama")[0], 2), tmp_path / "other")  # not the micro target
    with pytest.raises(ConfigError, match=r"init_from=.*another model; point init_from at heads trained for this "
                                          r"target, or drop it$"):
        train(compose_train(*SMALL, f"init_from={other}", f"out_dir={tmp_path / 'x'}"), tmp_path / "r")
