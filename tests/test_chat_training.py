"""Training data for drafters of chat targets (the target's own answers) and the distilled draft, on tiny models."""
from __future__ import annotations

import pytest
import torch

from experiments import chat_data, draft_training
from experiments.head_data import chat_windows
from specdec.models import tiny_random_pair

TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
CHATS = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a longer question here"}],
         [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "user", "content": "more?"}]]


@pytest.fixture(scope="module")
def tiny():
    target, _, tok = tiny_random_pair("llama", seed=0)
    tok.chat_template = TEMPLATE
    return target, tok


def test_batched_answers_equal_each_chats_own_greedy_answer(tiny):
    """Left padding in a batch must not change what the target answers."""
    target, tok = tiny
    rows = chat_data.generate_chat_rows(target, tok, CHATS, max_new_tokens=6, batch=3, progress=False)
    for i, chat in enumerate(CHATS):
        ids = tok(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False), return_tensors="pt",
                  add_special_tokens=False).input_ids  # [1, P]
        ref = target.generate(ids, do_sample=False, max_new_tokens=6, pad_token_id=tok.eos_token_id)[0]
        stop = (ref[ids.shape[1]:] == tok.eos_token_id).nonzero()
        ref = ref[: ids.shape[1] + int(stop[0]) + 1] if len(stop) else ref
        assert rows.prompt_lengths[i] == ids.shape[1]
        assert rows.ids[i, : rows.lengths[i]].tolist() == ref.tolist()
    mask = rows.response_mask()  # the positions whose next token is an answer token
    assert mask.sum(1).tolist() == (rows.lengths - rows.prompt_lengths).tolist()
    assert all(bool(mask[i, rows.prompt_lengths[i] - 1]) and not bool(mask[i, rows.prompt_lengths[i] - 2])
               for i in range(len(CHATS)))


def test_answers_cut_by_ctrl_c_are_kept_and_the_rerun_goes_on_to_the_same_rows(tiny, tmp_path, capsys):
    """The answers are saved after every batch: Ctrl-C in the second batch keeps the first batch's, and the rerun
    answers only the rest, to rows equal to an uncut run's (build_draft lost every answer on Ctrl-C)."""
    target, tok = tiny
    chats = CHATS * 2
    whole = chat_data.generate_chat_rows(target, tok, chats, max_new_tokens=4, batch=2, progress=False,
                                         temperature=0.8, seed=3)
    calls, real = [], target.generate

    def cut(*args, **kwargs):
        calls.append(1)
        if calls == [1, 1] and not partial.with_name("cut").exists():
            partial.with_name("cut").touch()
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    partial = tmp_path / "answers.partial.safetensors"
    target.generate = cut
    try:
        with pytest.raises(KeyboardInterrupt):
            chat_data.generate_chat_rows(target, tok, chats, max_new_tokens=4, batch=2, progress=False,
                                         temperature=0.8, seed=3, partial=partial)
        assert len(chat_data._load_partial(partial, len(chats))[0]) == 2  # the first batch's two rows
        calls.clear()
        again = chat_data.generate_chat_rows(target, tok, chats, max_new_tokens=4, batch=2, progress=False,
                                             temperature=0.8, seed=3, partial=partial)
    finally:
        del target.generate
    assert len(calls) == 2 and torch.equal(again.ids, whole.ids)  # two of three batches answered again
    assert "2 of 6 chats were answered before the run was cut" in capsys.readouterr().err
    partial.write_bytes(b"damaged")
    assert chat_data._load_partial(partial, len(chats)) == ({}, 0.0)  # answered again, not a failure


def test_rows_round_trip_and_windows(tiny, tmp_path):
    target, tok = tiny
    rows = chat_data.generate_chat_rows(target, tok, CHATS, max_new_tokens=4, progress=False)
    chat_data.save_rows(rows, tmp_path / "rows.safetensors")
    again = chat_data.load_rows(tmp_path / "rows.safetensors")
    assert torch.equal(again.ids, rows.ids) and again.pad_id == rows.pad_id
    windows = chat_windows(rows, 8)  # [R, 8]: each row's last 8 tokens
    for i in range(len(CHATS)):
        assert windows[i].tolist() == rows.ids[i, rows.lengths[i] - 8 : rows.lengths[i]].tolist()


def test_distilled_draft_starts_from_the_target_and_learns_its_answers(tiny):
    target, tok = tiny
    chats = [[{"role": "user", "content": f"question {i}"}] for i in range(12)]
    rows = chat_data.generate_chat_rows(target, tok, chats, max_new_tokens=8, progress=False)
    draft = draft_training.init_draft(target, 1)
    assert torch.equal(draft.model.layers[0].mlp.up_proj.weight, target.model.layers[0].mlp.up_proj.weight)
    settings = draft_training.DraftSettings(layers=1, heldout_chats=2, steps=30, batch_size=4, lr=3e-3)
    before = draft_training.evaluate(draft, rows, settings)
    embed = draft.model.embed_tokens.weight.clone()
    metrics = draft_training.train(draft, rows, settings, progress=False)
    after = draft_training.evaluate(draft, rows, settings)
    assert torch.equal(draft.model.embed_tokens.weight, embed)  # embeddings stay frozen
    assert metrics["final_train_loss"] < before["heldout_loss"]
    assert after["heldout_positions"] == int((rows.lengths - rows.prompt_lengths)[-2:].sum())


def test_missing_draft_names_the_build_command(tmp_path, monkeypatch):
    """The command builds the draft where it was looked for (``cache_dir=`` when one was given)."""
    path, hint = draft_training.find_draft("smollm2", tmp_path)
    assert path is None and f"`python -m experiments.build_draft target=smollm2 cache_dir={tmp_path}`" in hint
    monkeypatch.setenv("SPECDEC_CACHE", str(tmp_path))
    assert "`python -m experiments.build_draft target=smollm2`" in draft_training.find_draft("smollm2")[1]


def test_a_draft_as_deep_as_its_target_is_refused_before_the_answers_are_generated(tiny, monkeypatch, tmp_path):
    """``build_draft layers=99`` went on to generate the target's answers (the expensive step) and would have built
    a 'draft' of 30 copied layers and 69 random ones."""
    from experiments import pretrained
    from specdec import models
    from specdec.errors import ConfigError

    target, tok = tiny
    monkeypatch.setattr(pretrained, "ensure_model", lambda name, cache_dir=None: tmp_path)
    monkeypatch.setattr(models, "load_causal_lm", lambda *args, **kwargs: target)
    monkeypatch.setattr(models, "load_tokenizer", lambda *args, **kwargs: tok)
    monkeypatch.setattr(chat_data, "ensure_generations", lambda *args, **kwargs: pytest.fail("generated first"))
    have = target.config.num_hidden_layers
    for layers in (have, have + 1):
        with pytest.raises(ConfigError, match=rf"layers={layers}: .* it has {have}; give 1\.\.{have - 1}"):
            draft_training.build_draft("smollm2", draft_training.DraftSettings(layers=layers), cache_dir=str(tmp_path))


def test_the_tokenizers_pad_token_pads_the_rows_and_eos_only_stands_in(tiny):
    """A tokenizer with a pad token pads with it (planted bug: the end-of-turn id always, which a head's data then
    reads as answers ending); without one the eos id stands in. The answers are the same either way."""
    import copy

    target, tok = tiny
    with_pad = copy.deepcopy(tok)
    with_pad.pad_token_id = 5
    padded = chat_data.generate_chat_rows(target, with_pad, CHATS, max_new_tokens=4, progress=False)
    plain = chat_data.generate_chat_rows(target, tok, CHATS, max_new_tokens=4, progress=False)
    assert (padded.pad_id, plain.pad_id) == (5, tok.eos_token_id)
    for i, length in enumerate(padded.lengths.tolist()):
        assert padded.ids[i, :length].tolist() == plain.ids[i, :length].tolist()
        assert set(padded.ids[i, length:].tolist()) <= {5}
    assert int(padded.lengths.min()) < padded.ids.shape[1]  # some row is padded
