"""Boundaries of the inputs (prompt windows and files, command-line values, config values) and of the training
loops' arithmetic (the learning-rate schedule, the answer loss and its held-out mean), on tiny data."""
from __future__ import annotations

import argparse
import json
import re
from types import SimpleNamespace

import pytest
import torch
from hydra import initialize_config_dir

from experiments import cli, data, draft_training, head_training
from experiments.datasets import PromptSet, SpecBench
from specdec.errors import ConfigError
from specdec.models import tiny_random_pair

# --------------------------------------------------------------------------- prompt windows and files


def _lines(n: int, chars: int) -> list[str]:
    """``n`` lines of ``chars`` characters each, newline included."""
    return [f"{i:04d}".ljust(chars - 1, "x") + "\n" for i in range(n)]


def test_prompt_window_takes_lines_up_to_exactly_the_character_limit():
    lines = _lines(data.PROMPT_LINES + data.CONTINUATION_LINES, data.PROMPT_MAX_CHARS // data.PROMPT_LINES)
    assert data.prompt_window(lines, 0) == "".join(lines[: data.PROMPT_LINES]).rstrip("\n")  # 1200 characters
    few = _lines(data.PROMPT_LINES + data.CONTINUATION_LINES, data.PROMPT_MAX_CHARS // data.MIN_PROMPT_LINES)
    assert data.prompt_window(few, 0) == "".join(few[: data.MIN_PROMPT_LINES]).rstrip("\n")  # the fewest lines


def test_prompt_window_needs_the_continuation_lines():
    lines = _lines(data.PROMPT_LINES + data.CONTINUATION_LINES, 10)
    assert data.prompt_window(lines[:-1], 0) is None and data.prompt_window(lines, 0) is not None
    assert data.prompt_window(lines + lines[:1], 1) is not None and data.prompt_window(lines, 1) is None


def test_heldout_prompt_sources_name_their_first_line_from_one():
    (prompt,) = data.heldout_prompts(1)
    path, line = prompt.source.rsplit(":", 1)
    assert line == "1"
    assert data.corpus.read_text(data.corpus.default_corpus_root() / path).startswith(prompt.text)


def test_prompt_file_defaults_and_turns(tmp_path):
    """A record without question_id is named by its line number (from 1, blank lines counted); a chat's further
    turns are kept only when there are some."""
    chat = [{"role": "user", "content": "hi"}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([json.dumps({"turns": ["a"]}), "", json.dumps({"turns": ["b"], "messages": chat}),
                               json.dumps({"turns": ["c", "d"], "messages": chat})]) + "\n")
    prompts = data.load_prompts(path)
    assert [p.question_id for p in prompts] == [1, 3, 4]
    assert [p.turns for p in prompts] == [None, None, ["c", "d"]]


def test_prompt_counts_must_be_positive(tmp_path):
    with pytest.raises(ConfigError, match="max_prompt_tokens=0"):
        PromptSet(max_prompt_tokens=0)
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"turns": ["a"]}) + "\n")
    with pytest.raises(ConfigError, match="num_prompts=0"):
        SpecBench(path).load(0)
    assert len(SpecBench(path, max_prompt_tokens=1).load(1)) == 1


# --------------------------------------------------------------------------- command-line values


def test_argument_types_at_their_bounds():
    assert cli.int_at_least(1)("1") == 1 and cli.ints_at_least(1)("2,,4,") == [2, 4]
    assert cli.temperature("0") == 0.0 and cli.thresholds("0,0.99") == [0.0, 0.99]
    for parse, text in ((cli.int_at_least(1), "0"), (cli.temperature, "nan"), (cli.temperature, "-0.1"),
                        (cli.thresholds, "1"), (cli.ints_at_least(1), ",")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


def test_an_output_file_that_is_a_directory_is_refused(tmp_path):
    assert cli.output_file(str(tmp_path / "new" / "out.md")) == str(tmp_path / "new" / "out.md")
    assert (tmp_path / "new").is_dir()  # made now, before the run
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        cli.output_file(str(tmp_path))


# --------------------------------------------------------------------------- layer skip


def test_layer_skip_view_keeps_its_layers_types_and_is_built_once_per_target():
    from drafters import LayerSkipDrafter
    from drafters.layer_skip import truncated_view

    target, _, _ = tiny_random_pair("qwen2", seed=0, layers=3)
    assert len(target.config.layer_types) == 3
    assert truncated_view(target, 1).config.layer_types == target.config.layer_types[:1]
    drafter = LayerSkipDrafter(layers=2, target=target)
    view = drafter.model
    drafter.bind(target)
    drafter.step_shape(target)
    assert drafter.model is view and view.config.num_hidden_layers == 2


# --------------------------------------------------------------------------- training arithmetic


def test_head_lr_schedule_warms_up_from_the_first_step_and_ends_at_a_tenth():
    assert head_training.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert head_training.lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert head_training.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert head_training.lr_at(55, 100, 1.0, 10) == pytest.approx(0.55)  # half way down the cosine
    assert head_training.lr_at(100, 100, 1.0, 10) == pytest.approx(0.1)


def test_a_training_target_without_a_tokenizer_points_at_the_tokenizer_option(tmp_path):
    """``train_medusa`` / ``train_eagle target=<dir>`` on a model saved without its tokenizer: the error names the
    training config's ``tokenizer=`` option (a trial was told to save one there instead)."""
    from omegaconf import OmegaConf

    from specdec.errors import SpecDecError

    tiny_random_pair()[0].save_pretrained(tmp_path / "target")
    cfg = OmegaConf.create({"target": str(tmp_path / "target"), "tokenizer": None, "dtype": "float32", "cache_dir": None})
    with pytest.raises(SpecDecError, match=r"holds no tokenizer .*: pass tokenizer=<the directory that holds it>"):
        head_training.load_target(cfg)

def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    torch.save({"step": 3, "settings": {"lr": 0.1, "steps": 10}}, path)
    assert head_training.load_checkpoint(path, {"lr": 0.1, "steps": 10})["step"] == 3
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.1 -> 0.2\)"):
        head_training.load_checkpoint(path, {"lr": 0.2, "steps": 10})
    whole = path.read_bytes()
    for cut, says in ((0, "EOFError"), (40, "RuntimeError: PytorchStreamReader failed")):  # an empty detail before
        path.write_bytes(whole[:cut])
        with pytest.raises(ConfigError, match=rf"checkpoint .* is unreadable \({says}.*\); delete it or pass resume=false"):
            head_training.load_checkpoint(path, {"lr": 0.1, "steps": 10})


@pytest.mark.parametrize("recipe", ["medusa", "eagle"])
@pytest.mark.parametrize(("override", "fragment"), [
    ("precision=fp8", "precision='fp8': use one of auto, fp32, bf16"), ("lr=0", "lr=0 must be > 0"),
    ("steps=0", "steps=0: it must be an integer >= 1"), ("draft_vocab=-5", "draft_vocab=-5: use 0"),
    ("eval_batch_size=0", "eval_batch_size=0: it must be an integer >= 1"),  # it failed after training
    ("eval_tokens=0", "eval_tokens=0: it must be an integer >= 1"),  # it evaluated one row anyway
    ("generated_fraction=1.5", "generated_fraction=1.5, generated_temperature=0"),
    ("generated_max_new_tokens=0", "generated_max_new_tokens=0: it must be an integer >= 1"),
])
def test_a_bad_training_setting_fails_before_the_target_loads(recipe, override, fragment, tmp_path, monkeypatch):
    """On a fresh machine the target is the embedded pair, built first (minutes): a wrong setting fails before."""
    from hydra import compose

    from experiments import train_eagle, train_medusa
    from tests.test_medusa import CONF

    def no_loading(cfg):
        raise AssertionError("the target was loaded before the settings were checked")

    monkeypatch.setattr(head_training, "load_target", no_loading)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(f"train_{recipe}", overrides=["zoo_size=micro", "logger=none", override, f"out_dir={tmp_path}"])
    train = {"medusa": train_medusa, "eagle": train_eagle}[recipe].train
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        train(cfg, tmp_path / "run")


def test_the_chats_answer_length_reaches_the_cache_and_the_checkpoints_settings(monkeypatch):
    """generated_source=chats asks chat_data for answers of generated_max_new_tokens (it asked for 128 whatever was
    set, so build_draft's cached answers, 96 tokens to 192 chats, were never read); a length other than the default
    is a checkpoint setting."""
    from omegaconf import OmegaConf

    from experiments import chat_data, head_data

    asked = {}
    monkeypatch.setattr(chat_data, "ensure_generations", lambda *a, **kw: (asked.update(kw), None))
    monkeypatch.setattr(head_data, "chat_windows", lambda rows, context: rows)
    cfg = OmegaConf.create({"generated_rows": 4, "generated_source": "chats", "generated_max_new_tokens": 96,
                            "cache_dir": None, "progress": False, "context": 64})
    head_data.generated_training_rows(cfg, None, None, "dir", None)
    assert asked["max_new_tokens"] == 96 and asked["count"] == 4
    assert head_data.answer_settings(cfg) == {"generated_max_new_tokens": 96}
    cfg.generated_max_new_tokens = head_data.DEFAULT_ANSWER_TOKENS
    assert head_data.answer_settings(cfg) == {}  # older checkpoints resume
    from experiments.head_checkpoints import setting_changes

    assert setting_changes({"generated_max_new_tokens": 96}, {}) == ["generated_max_new_tokens: 96 -> 128"]
    cfg.generated_source = "corpus"
    cfg.generated_max_new_tokens = 96
    assert head_data.answer_settings(cfg) == {}


def test_a_training_context_past_the_targets_fails_before_any_data_is_made():
    """A context past max_position_embeddings trained positions decoding refuses (it trained silently)."""
    target, _, _ = tiny_random_pair("llama", seed=0, vocab=50)
    limit = target.config.max_position_embeddings
    head_training.check_context(limit, target)
    with pytest.raises(ConfigError, match=rf"context={limit + 1}: the target reads at most {limit} positions"):
        head_training.check_context(limit + 1, target)


def test_answer_loss_scores_the_next_token_at_the_answer_positions():
    """The loss is the full model's cross-entropy of token t + 1 at each masked position t (position 0 too: a
    one-token prompt)."""
    target, _, _ = tiny_random_pair("llama", seed=0, vocab=50)
    draft = draft_training.init_draft(target, 1)
    ids = torch.tensor([[3, 7, 11, 5, 2, 9], [4, 4, 8, 1, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)  # row 1: a one-token prompt
    with torch.no_grad():
        loss, hits = draft_training.answer_loss(draft, ids, mask)
        logits = draft(input_ids=ids).logits  # [B, T, V]
    where = mask[:, :-1].nonzero().tolist()
    picked = torch.stack([logits[b, t] for b, t in where])  # [M, V]
    labels = torch.tensor([int(ids[b, t + 1]) for b, t in where])  # [M]
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(picked, labels)), rel=1e-5)
    assert hits.tolist() == (picked.argmax(-1) == labels).tolist() and len(where) == 6


def test_heldout_loss_is_the_mean_over_positions(monkeypatch):
    """Two held-out batches (8 chats then 2, 3 answer positions each) of losses 1 and 4: (24 + 4 * 6) / 30."""
    settings = draft_training.DraftSettings(chats=12, heldout_chats=10)
    monkeypatch.setattr(draft_training, "_batch", lambda rows, idx: (idx, None))
    monkeypatch.setattr(draft_training, "answer_loss", lambda draft, idx, mask: (
        torch.tensor(1.0 if len(idx) == 8 else 4.0), torch.arange(3 * len(idx)) % 3 == 0))
    report = draft_training.evaluate(None, SimpleNamespace(ids=torch.zeros(12, 1)), settings)
    assert report == {"heldout_loss": pytest.approx(1.6), "alpha": pytest.approx(1 / 3), "heldout_positions": 30}


def test_draft_settings_keep_a_training_chat():
    with pytest.raises(ConfigError, match="leaves no training chat"):
        draft_training.DraftSettings(chats=4, heldout_chats=4)
    assert draft_training.DraftSettings(chats=5, heldout_chats=4).chats == 5


def test_the_last_training_step_is_logged_off_the_log_interval(tmp_path):
    """steps=3, log_every=2: the training metrics of steps 2 and 3 (the last one, off the interval) are logged,
    then the eval metrics at step 3."""
    from experiments.train_medusa import train
    from tests.test_medusa import compose_train
    from tests.test_medusa_memo import SMALL

    train(compose_train(*SMALL, "steps=3", "log_every=2", f"out_dir={tmp_path / 'heads'}"), tmp_path / "run")
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["step"], "train/loss" in r) for r in logged] == [(2, True), (3, True), (3, False)]
