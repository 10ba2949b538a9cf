"""Mutation pass 24: the verifier's attention plumbing, the captured-cost helpers and the training data of
draft heads and distilled drafts (each test names the planted bug it catches)."""
from __future__ import annotations

import types

import pytest
import torch
from omegaconf import OmegaConf

from experiments import captured_costs, corpus, draft_training, head_data
from experiments.chat_data import ChatRows
from experiments.synthetic import random_prompts, synthetic_pair
from specdec.errors import ConfigError


def _llama(layers: int = 2, vocab: int = 64, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)
    return LlamaForCausalLM(config).eval()


# --- verifier/attention.py -----------------------------------------------------------------------------------


def test_the_dense_tree_mask_shows_the_prefix_and_copies_the_tree_mask_whole():
    """Every column of the tree mask is copied (planted bug: column 0, the root, forced visible), and one token
    needs no mask only when it sees itself."""
    from verifier.attention import dense_tree_mask

    tree = torch.tensor([[True, False, False], [False, True, False], [True, True, True]])  # [3, 3]
    mask = dense_tree_mask(2, tree)  # [1, 1, 3, 5]
    assert mask.shape == (1, 1, 3, 5) and mask[0, 0, :, :2].all()
    assert torch.equal(mask[0, 0, :, 2:], tree)
    assert dense_tree_mask(4, torch.ones(1, 1, dtype=torch.bool)) is None
    hidden = dense_tree_mask(1, torch.zeros(1, 1, dtype=torch.bool))  # [1, 1, 1, 2]
    assert hidden.tolist() == [[[[True, False]]]]


def test_the_sdpa_backend_applies_the_models_scaling():
    """A model's own attention scale (Gemma-style, not 1/sqrt(D)) reaches SDPA (planted bug: ``scale=None``)."""
    from torch.nn.functional import scaled_dot_product_attention

    from verifier.attention import dense_tree_mask, sdpa_tree_attention

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 3, 8, generator=gen)  # [B, Hq, n, D]
    k, v = torch.randn(2, 1, 2, 7, 8, generator=gen)  # [B, Hkv, S, D] each
    tree = torch.tensor([[True, False, False], [True, True, False], [True, False, True]])  # [3, 3]
    key_mask = dense_tree_mask(4, tree)  # [1, 1, 3, 7]
    out, _ = sdpa_tree_attention(None, q, k, v, None, scaling=0.9, specdec_prefix_len=4, specdec_tree_mask=tree,
                                 specdec_key_mask=key_mask)  # [B, n, Hq, D]
    ref = scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=0.9, enable_gqa=True)  # [B, Hq, n, D]
    torch.testing.assert_close(out, ref.transpose(1, 2))


def test_the_triton_backend_hands_the_plan_the_models_scaling():
    """The tree plan gets the model's scale, or 1/sqrt(D) when the model gives none (planted bug: the model's
    scale ignored)."""
    from verifier.attention import triton_tree_attention

    scales = []

    def plan(q, k, v, sm_scale):
        scales.append(sm_scale)
        return q

    q = torch.zeros(1, 2, 3, 16)  # [B, Hq, n, D]
    for scaling in (0.7, None):
        out, _ = triton_tree_attention(None, q, q, q, None, scaling=scaling, specdec_prefix_len=0,
                                       specdec_tree_plan=plan)
        assert out.shape == (1, 3, 2, 16)  # [B, n, Hq, D]
    assert scales == [0.7, 0.25]


# --- experiments/captured_costs.py ---------------------------------------------------------------------------


def test_a_timing_is_the_median_and_the_bandwidth_counts_read_and_write(monkeypatch):
    """``_median_s`` takes the median of its runs (planted bug: the minimum), and ``copy_bandwidth`` counts the
    bytes read plus the bytes written (planted bug: only one of them)."""
    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # runs of 1, 3 and 2 seconds
    monkeypatch.setattr(captured_costs, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    assert captured_costs._median_s(lambda: None, torch.device("cpu"), 3) == 2.0
    monkeypatch.setattr(captured_costs, "_median_s", lambda fn, device, reps: 0.5)
    assert captured_costs.copy_bandwidth(torch.device("cpu"), nbytes=1024) == 2 * 1024 / 0.5


def test_kv_bytes_take_the_configs_head_dim():
    """A config whose ``head_dim`` is not hidden / heads (planted bug: head_dim derived from the width)."""
    model = _llama(layers=3, head_dim=16)  # hidden 32 over 4 heads would be 8
    assert captured_costs.kv_bytes_per_token(model) == 2 * 3 * 2 * 16 * 4  # K and V, 3 layers, 2 KV heads, fp32


def test_the_floor_line_reports_the_ratios_and_the_draft():
    """The sentence ``bench --compile`` prints (planted bugs: the floor ratio or the width ratio inverted)."""
    costs = {"target": {1: 0.004, 2: 0.005, 3: 0.006}, "draft": 0.001, "floor_s": 0.002, "bandwidth": 2e12,
             "captured": False}
    line = captured_costs.floor_line(costs, 512)
    assert line == ("Fixed-shape step's forward costs (eager: not captured) at context 512: target w1 4.00 ms = "
                    "2.00x its read floor of 2.00 ms (weights + KV at 2000 GB/s measured copy bandwidth), w3 6.00 ms "
                    "(T(w3)/T(1) 1.50); draft w1 1.00 ms.")
    assert "draft" not in captured_costs.floor_line(costs | {"draft": None, "captured": True}, 512)


def test_costs_are_captured_only_when_the_drafts_forward_is_too(monkeypatch):
    """``captured``: the target's widths and the draft's forward all replayed (planted bug: the draft's ignored)."""
    monkeypatch.setattr(captured_costs, "copy_bandwidth", lambda device: 1e9)
    monkeypatch.setattr(captured_costs, "read_floor_s", lambda *a: 0.001)
    target = types.SimpleNamespace(parameters=lambda: iter([torch.zeros(1)]))
    monkeypatch.setattr(captured_costs, "static_curve", lambda model, context, widths, *a: (
        {w: 0.01 for w in widths}, model is target))
    assert captured_costs.static_costs(target, "draft", 8, [2])["captured"] is False
    assert captured_costs.static_costs(target, None, 8, [2])["captured"] is True


def test_the_static_block_forward_is_the_models_causal_forward():
    """Each width's forward after the random context gives the model's own logits for those tokens (planted bug:
    the block's mask not causal)."""
    model = _llama()
    (w, run, replayed), = captured_costs.static_forwards(model, 6, (3,), compile="none")
    gen = torch.Generator().manual_seed(0)  # the context and block static_forwards draws
    context = torch.randint(1, 64, (6,), generator=gen)  # [6]
    block = torch.randint(1, 64, (1, 3), generator=gen)  # [1, 3]
    with torch.no_grad():
        ref = model(torch.cat([context[None], block], 1)).logits[0, 6:]  # [3, V]
    assert w == 3 and not replayed
    torch.testing.assert_close(run()[0].float(), ref, atol=1e-4, rtol=1e-4)


# --- experiments/head_data.py --------------------------------------------------------------------------------


def test_training_batches_mix_the_generated_share_from_their_own_stream_and_resume_exactly():
    """``generated_fraction`` rounds to the nearest row (planted bug: truncated), the generated rows are drawn with
    their own seed (planted bug: the corpus's), and batches from ``start`` are the tail of a run from 0 (planted
    bug: the corpus stream restarted)."""
    rows = torch.arange(40).view(20, 2)  # [R, T]
    cfg = OmegaConf.create({"batch_size": 4, "generated_fraction": 0.7, "steps": 6, "seed": 3})
    full = list(head_data.training_batches(rows, rows + 100, cfg, 0))  # [4, 2] each: 1 corpus + 3 generated
    assert len(full) == 6 and all(b.shape == (4, 2) and int((b >= 100).sum()) == 6 for b in full)
    cfg.generated_fraction = 0.5
    half = list(head_data.training_batches(rows, rows.clone(), cfg, 0))  # 2 corpus + 2 generated rows each
    assert any(not torch.equal(b[:2], b[2:]) for b in half)
    resumed = list(head_data.training_batches(rows, rows.clone(), cfg, 4))
    assert len(resumed) == 2 and all(torch.equal(a, b) for a, b in zip(resumed, half[4:]))
    cfg.generated_fraction = 0.7
    by_corpus_only = list(head_data.training_batches(rows, None, cfg, 0))
    assert [b[:1].tolist() for b in full] != [b[:2].tolist() for b in by_corpus_only]


def test_generated_rows_keep_the_prompt_and_continue_it_greedily():
    """Each row is ``prompt`` source tokens, then the target's own greedy tokens (planted bug: one more source token
    kept); a prompt as long as the context is refused."""
    model = _llama()
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = 0, None  # EOS is not suppressed
    source = torch.randint(1, 64, (3, 10), generator=torch.Generator().manual_seed(1))  # [R, T]
    rows = head_data.generate_rows(model, source, 2, 4, 0.0, seed=0, batch=1)  # [2, 10]
    assert rows.shape == (2, 10)
    for row in rows:
        assert any(torch.equal(row[:4], s[:4]) for s in source)
        with torch.no_grad():
            greedy = model(row[None, :-1]).logits[0].argmax(-1)  # [9]
        assert torch.equal(row[4:], greedy[3:])
    with pytest.raises(ConfigError, match="between 1 and context - 1 = 9"):
        head_data.generate_rows(model, source, 2, 10, 0.0, seed=0)


def test_sampled_rows_of_each_batch_take_their_own_seed():
    """Batch i samples under ``seed + i`` (planted bug: every batch under ``seed``: the same prompt gives the same
    row in every batch)."""
    model = _llama()
    model.generation_config.pad_token_id = 0
    source = torch.arange(1, 13).repeat(4, 1)  # [4, 12]: one row four times
    rows = head_data.generate_rows(model, source, 4, 2, 1.0, seed=5, batch=1)  # [4, 12]
    assert len({tuple(r.tolist()) for r in rows}) > 1


def test_the_draft_vocabulary_and_answer_length_bounds():
    """A draft vocabulary as large as the target's is refused (planted bug: only larger), and a bool answer length
    is not an integer (planted bug: ``True`` taken as 1)."""
    model = _llama()
    with pytest.raises(ConfigError, match="draft_vocab=64 is not below the target's vocabulary of 64"):
        head_data.check_draft_vocab(OmegaConf.create({"draft_vocab": 64}), model)
    assert head_data.check_draft_vocab(OmegaConf.create({"draft_vocab": 63}), model) == (63, 64)
    with pytest.raises(ConfigError, match="draft_vocab=-3 is negative: use 0 for the whole vocabulary"):
        head_data.check_draft_vocab(OmegaConf.create({"draft_vocab": -3}), model)
    with pytest.raises(ConfigError, match="generated_max_new_tokens=True"):
        head_data.answer_settings(OmegaConf.create({"generated_max_new_tokens": True}))


def test_the_draft_vocabulary_counts_the_generated_rows_too():
    """The target's own rows weigh as much as the corpus (planted bug: only the corpus counted)."""
    model = _llama()
    model.generation_config.eos_token_id = 1
    corpus_rows = torch.full((4, 8), 5)  # [4, 8]
    generated = torch.full((4, 8), 9)  # [4, 8]
    ids = head_data.draft_vocabulary(OmegaConf.create({"draft_vocab": 3}), model, corpus_rows, generated)  # [3]
    assert ids.tolist() == [1, 5, 9]


# --- experiments/draft_training.py ---------------------------------------------------------------------------


def _chat_rows() -> ChatRows:
    ids = torch.tensor([[3, 4, 5, 6, 7, 0], [3, 4, 8, 9, 10, 11], [5, 6, 7, 0, 0, 0], [4, 5, 6, 7, 8, 0]])  # [4, 6]
    return ChatRows(ids, torch.tensor([5, 6, 3, 5]), torch.tensor([2, 2, 1, 3]), 0)


def test_a_batch_is_as_wide_as_its_longest_row_and_settings_refuse_bools():
    """``_batch`` keeps every token of the longest row (planted bug: cut to the shortest), and a bool setting is not
    an integer (planted bug: ``True`` taken as 1)."""
    ids, mask = draft_training._batch(_chat_rows(), torch.tensor([0, 2]))  # [2, 5] each
    assert ids.tolist() == [[3, 4, 5, 6, 7], [5, 6, 7, 0, 0]] and mask.shape == (2, 5)
    with pytest.raises(ConfigError, match="steps=True: it must be an integer >= 1"):
        draft_training.DraftSettings(steps=True)


def test_the_draft_trains_its_layers_and_norm_on_the_training_chats_only(monkeypatch):
    """The held-out chats never reach training (planted bug: the whole rows drawn) and the final norm trains with
    the layers (planted bug: layers only)."""
    seen = []
    real = draft_training._batch
    monkeypatch.setattr(draft_training, "_batch", lambda rows, idx: seen.append(idx.tolist()) or real(rows, idx))
    draft = _llama(layers=1)
    settings = draft_training.DraftSettings(layers=1, chats=4, heldout_chats=1, steps=4, batch_size=3)
    metrics = draft_training.train(draft, _chat_rows(), settings, progress=False)
    assert metrics["train_rows"] == 3 and sorted({i for batch in seen for i in batch}) == [0, 1, 2]
    trained = sum(p.numel() for n, p in draft.named_parameters() if n.startswith(("model.layers.", "model.norm.")))
    assert metrics["trainable_params"] == trained and draft.model.norm.weight.numel() == 32


# --- experiments/synthetic.py and experiments/corpus.py -------------------------------------------------------


def test_synthetic_prompts_avoid_the_pad_id_and_weights_follow_the_seed():
    """Random prompt ids never take the pad id 0 (planted bug: drawn from 0), and the seed decides the weights
    (planted bug: the seed not applied)."""
    prompts = random_prompts(3, 4, 200, seed=1)  # 4 x [1, 200] over a vocabulary of 3
    assert all(p.shape == (1, 200) and p.min() >= 1 for p in prompts) and {int(p.max()) for p in prompts} == {2}
    torch.manual_seed(123)
    a, _ = synthetic_pair("llama-micro", "cpu", torch.float32, seed=0)
    torch.manual_seed(456)
    b, _ = synthetic_pair("llama-micro", "cpu", torch.float32, seed=0)
    c, _ = synthetic_pair("llama-micro", "cpu", torch.float32, seed=1)
    head = a.lm_head.weight  # [V, H]
    assert torch.equal(head, b.lm_head.weight) and not torch.equal(head, c.lm_head.weight)


def test_the_corpus_walk_excludes_tests_sorts_and_reads_bad_bytes(tmp_path):
    """Test packages at the top are excluded (planted bug: the first directory not checked), ``testing.py`` is not
    a test file (planted bug: any ``test*`` name), excluded directories are left out and files come sorted (planted
    bug: no sort), and undecodable bytes are replaced (planted bug: a UnicodeDecodeError)."""
    assert corpus.is_excluded("test/a.py") and corpus.is_excluded("pkg/tests/b.py")
    assert corpus.is_excluded("test_x.py") and not corpus.is_excluded("testing.py")
    for rel in ("zeta.py", "alpha/mod.py", "beta.py", "test/hidden.py", "pkg/site-packages/dep.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    found = corpus._all_python_files(tmp_path)
    assert [rel for rel, _ in found] == ["alpha/mod.py", "beta.py", "zeta.py"]
    bad = tmp_path / "bad.py"
    bad.write_bytes(b"x = '\xff'\n")
    assert corpus.read_text(bad) == "x = '\ufffd'\n"


def test_a_path_in_the_bucket_at_the_held_out_percentage_trains():
    """``HELDOUT_PERCENT`` buckets are held out, 0..4 (planted bug: bucket 5 too)."""
    at = next(f"m{i}.py" for i in range(10_000)
              if int(corpus.sha256_hex(f"m{i}.py")[:16], 16) % 100 == corpus.HELDOUT_PERCENT)
    below = next(f"m{i}.py" for i in range(10_000)
                 if int(corpus.sha256_hex(f"m{i}.py")[:16], 16) % 100 == corpus.HELDOUT_PERCENT - 1)
    assert corpus.split_of(at) == "train" and corpus.split_of(below) == "heldout"
