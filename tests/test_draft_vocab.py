"""Draft vocabularies (drafters.draft_vocab): the frequency ranking, the reduced LM head, EAGLE and Medusa
heads over one (saved, loaded, checked), greedy equality, losslessness of rejection sampling when the
draft cannot propose some tokens (a planted bug fails in the same cell), and training with one."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from drafters import DraftModelDrafter, EagleDrafter, MedusaDrafter
from drafters.draft_vocab import (
    DraftVocabHead,
    check_ids,
    expressible,
    frequent_tokens,
    soft_cross_entropy,
    vocab_of,
    with_draft_vocab,
)
from drafters.eagle_heads import EagleHead, EagleHeadError, load_head, save_head
from drafters.medusa_heads import MedusaHeads, MedusaHeadsError, load_heads, save_heads
from specdec.errors import NonFiniteLogitsError
from tests.greedy import check_greedy, greedy_cases
from tests.lossless import check_cell
from tests.test_eagle import noisy_head
from tests.tiny_models import noisy_copy, pair, peaky_noisy_pair, peaky_pair, prompts
from verifier.verifier import check_finite

ROOT = Path(__file__).resolve().parents[1]


def test_frequent_tokens_weights_sources_equally_and_keeps_eos():
    big = torch.tensor([[5] * 90 + [6] * 10])  # one source: 5 dominates
    small = torch.tensor([[7, 7, 7, 2]])  # another: 7 dominates; each source counts equally
    assert frequent_tokens([big, small, None], 2, 10).tolist() == [5, 7]
    assert frequent_tokens([big, small], 3, 10, always=[9]).tolist() == [5, 7, 9]  # EOS always in, ascending
    assert frequent_tokens([torch.tensor([[1, 3]])], 3, 6).tolist() == [0, 1, 3]  # ties: the lower id
    assert check_ids(torch.tensor([3, 1]), 6) == "draft vocabulary ids must be strictly ascending"
    assert "must lie in [0, 6)" in check_ids(torch.tensor([1, 6]), 6)


def test_draft_vocab_head_scores_its_tokens_only_and_trains_its_rows():
    torch.manual_seed(0)
    full = torch.randn(10, 4)  # [V, H]
    head = DraftVocabHead(10, 3, 4)
    head.set_vocab(torch.tensor([1, 4, 8]), full)
    h = torch.randn(2, 5, 4, requires_grad=True)
    out = head(h)  # [2, 5, 10]
    keep = torch.tensor([1, 4, 8])
    assert torch.allclose(out[..., keep], h @ full[keep].T, atol=1e-6)
    assert torch.isneginf(out[..., [0, 2, 3, 5, 6, 7, 9]]).all()
    logq = torch.log_softmax(out, -1)
    labels = expressible(logq, torch.tensor([[1, 2, 4, 9, 8]] * 2))
    assert labels[0].tolist() == [1, -100, 4, -100, 8]
    loss = torch.nn.functional.nll_loss(logq.reshape(-1, 10), labels.reshape(-1)) + soft_cross_entropy(
        torch.randn(2, 5, 10), logq)
    loss.backward()
    assert torch.isfinite(loss) and head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    frozen = DraftVocabHead(10, 3, 4, trainable=False)
    frozen.set_vocab(keep)
    with pytest.raises(RuntimeError, match="bind_rows"):
        frozen(h)
    frozen.bind_rows(full)
    assert torch.allclose(frozen(h), out) and "rows" not in frozen.state_dict()


def test_draft_logits_may_mask_tokens_but_not_all_of_them():
    check_finite(torch.tensor([[0.5, float("-inf")]]), "draft", masked_ok=True)
    for bad in ([[float("-inf"), float("-inf")]], [[float("nan"), 0.0]], [[float("inf"), 0.0]]):
        with pytest.raises(NonFiniteLogitsError):
            check_finite(torch.tensor(bad), "draft", masked_ok=True)
    with pytest.raises(NonFiniteLogitsError):
        check_finite(torch.tensor([[0.5, float("-inf")]]), "target")


@pytest.mark.parametrize("kind", ["eagle2", "eagle3", "medusa"])
def test_heads_over_a_draft_vocabulary_round_trip_and_decode_greedily(kind, tmp_path):
    target, _, tok = pair("llama")
    vocab = target.config.vocab_size
    ids = torch.arange(0, vocab, 2)  # every other token: drafts often miss, decoding must not care
    cases = greedy_cases(target, prompts(tok, 6, seed=3), int(target.generation_config.eos_token_id))
    if kind == "medusa":
        heads = MedusaHeads.for_target(target, 3, init="random", draft_vocab=ids)
        save_heads(heads, tmp_path)
        loaded = load_heads(tmp_path)
        hidden = torch.randn(4, heads.hidden_size)
        assert loaded.draft_vocab == len(ids) and torch.equal(heads(hidden), loaded(hidden))
        check_greedy(target, MedusaDrafter(loaded, tree="binary"), cases)
        with pytest.raises(MedusaHeadsError, match="already"):
            loaded.use_draft_vocab(ids)
        error, key = MedusaHeadsError, "heads.0.lm_head.ids"
    else:
        head = EagleHead.for_target(target, kind, draft_vocab=ids)
        save_head(head, tmp_path)
        loaded = load_head(tmp_path).bind(target)
        x, f = torch.randint(0, vocab, (1, 5)), torch.randn(1, 5, head.hidden_size)
        assert loaded.draft_vocab == len(ids) and torch.equal(head(x, f)[0], loaded(x, f)[0])
        assert json.loads((tmp_path / "eagle_config.json").read_text())["draft_vocab"] == len(ids)
        for shape in ({"num_speculative_tokens": 3}, {"budget": 8, "num_speculative_tokens": 3}):
            check_greedy(target, EagleDrafter(loaded, **shape), cases)
        error, key = EagleHeadError, "model.lm_head.ids"
    from safetensors.torch import load_file, save_file

    weights = next(tmp_path.glob("*.safetensors"))
    tensors = load_file(str(weights))
    assert tensors[key].dtype == torch.int64
    tensors[key] = tensors[key].flip(0)  # corrupt: not ascending
    save_file(tensors, str(weights))
    with pytest.raises(error, match="strictly ascending"):
        load_heads(tmp_path) if kind == "medusa" else load_head(tmp_path)


def test_a_draft_model_over_a_draft_vocabulary_is_a_view_and_decodes_greedily():
    target, _, tok = pair("llama")
    draft = noisy_copy("llama", noise=0.05)
    vocab = target.config.vocab_size
    ids = torch.arange(0, vocab, 2)
    view = with_draft_vocab(draft, ids)
    assert type(draft.lm_head).__name__ == "Linear" and view.model is draft.model  # shared body, own head
    assert view.config.draft_vocab_size == len(ids) and not hasattr(draft.config, "draft_vocab_size")
    x = torch.randint(0, vocab, (1, 6))
    full, part = draft(x).logits, view(x).logits  # [1, 6, V]
    assert torch.allclose(part[..., ids], full[..., ids], atol=1e-5) and torch.isneginf(part[..., 1::2]).all()
    cases = greedy_cases(target, prompts(tok, 6, seed=3), int(target.generation_config.eos_token_id))
    for shape in ({"num_speculative_tokens": 3}, {"tree": "binary"}, {"budget": 8}):
        check_greedy(target, DraftModelDrafter(draft, draft_vocab=ids, **shape), cases)


@pytest.mark.parametrize("rule", ["rejection", "accept_always"])
def test_a_draft_model_chain_over_a_draft_vocabulary_is_lossless(rule):
    target, draft = peaky_noisy_pair()
    check_cell(target, DraftModelDrafter(draft, 2, draft_vocab=torch.tensor([1, 2, 3, 5])), "t1.0", rule)


@pytest.mark.parametrize("rule", ["rejection", "accept_always"])
def test_rejection_is_lossless_when_the_draft_cannot_propose_some_tokens(rule):
    """An EAGLE-3 head whose draft vocabulary lacks two of the six tokens (the target emits both, token 4
    about a fifth of the time after the prompt): the
    sampled tree's q is zero there, and the recovered distribution must reach them."""
    target, _ = peaky_pair()
    head = noisy_head(target, "eagle3", 0.6).use_draft_vocab(torch.tensor([1, 2, 3, 5]))
    drafter = EagleDrafter(head, tree=[[0], [1], [0, 0]], tree_sampling="with_replacement")
    check_cell(target, drafter, "t1.0", rule)


def test_train_eagle_with_a_draft_vocabulary(tmp_path):
    out = tmp_path / "head"
    proc = subprocess.run([sys.executable, "-m", "experiments.train_eagle", "zoo_size=micro", "version=eagle2",
                           "draft_vocab=128", "steps=20", "batch_size=8", "context=96", "train_chars=200000",
                           "eval_tokens=2048", "eval_depth=3", "generated_rows=16", "eval_generated_rows=4",
                           "logger=none", "progress=false", "threads=1", f"out_dir={out}",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "eagle_config.json").read_text())
    assert config["draft_vocab"] == 128 and config["training"]["draft_vocab"] == 128
    from experiments.zoo import ensure_pair

    tok, target, _ = ensure_pair("micro").load()
    head = load_head(out).bind(target)
    ids = head.model.lm_head.ids
    assert ids.numel() == 128 and int(target.generation_config.eos_token_id) in ids.tolist()
    assert torch.equal(vocab_of(out), ids)  # what a draft model can reuse
    with pytest.raises(ValueError, match="no heads with a draft vocabulary"):
        vocab_of(tmp_path / "run")
    cases = greedy_cases(target, prompts(tok, 4, seed=5), int(target.generation_config.eos_token_id))
    assert check_greedy(target, EagleDrafter(head, num_speculative_tokens=3), cases) > 1.2
    bad = subprocess.run([sys.executable, "-m", "experiments.train_eagle", "zoo_size=micro", "draft_vocab=512",
                          "logger=none", "progress=false", f"hydra.run.dir={tmp_path / 'bad'}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=False)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode == 2 and len(errors) == 1 and "not below the target's vocabulary" in errors[0]


def test_medusa_soft_loss_over_draft_columns_equals_the_full_formula():
    """With the heads' draft vocabulary ``medusa_loss`` runs over those columns only (the teacher's softmax once
    for all heads); it equals the full-vocabulary formula, whose other columns the heads score -inf."""
    import torch.nn.functional as F

    from drafters.draft_vocab import soft_cross_entropy
    from experiments.medusa_training import medusa_loss

    gen = torch.Generator().manual_seed(0)
    vocab, ids = 300, torch.randperm(300, generator=gen)[:40].sort().values  # [40]
    scores = torch.randn(3, 2, 10, 40, generator=gen, requires_grad=True)  # [K, B, T, Vd]
    head_logits = torch.full((3, 2, 10, vocab), float("-inf")).index_copy(-1, ids, scores)  # [K, B, T, V]
    t_logits = torch.randn(2, 10, vocab, generator=gen) * 3  # [B, T, V]
    loss, per_head = medusa_loss(head_logits, t_logits, 0.8, ids)
    expected = [soft_cross_entropy(t_logits[:, i + 1 :], F.log_softmax(head_logits[i, :, : 9 - i], -1)) for i in range(3)]
    assert torch.allclose(torch.stack(per_head), torch.stack(expected).detach(), atol=1e-5)
    assert torch.allclose(loss, sum(0.8**i * e for i, e in enumerate(expected)), atol=1e-5)
    loss.backward()
    assert scores.grad is not None and torch.isfinite(scores.grad).all()


def test_a_draft_vocabulary_with_a_repeated_id_is_refused():
    """Ids must be strictly ascending: a repeated id would score one token twice and leave a column no label maps to."""
    assert check_ids(torch.tensor([1, 1, 3]), 6) == "draft vocabulary ids must be strictly ascending"
    assert check_ids(torch.tensor([1, 3]), 6) is None
