"""``draft_dtype=auto`` (and a drafter head's ``dtype: auto``): bfloat16 on a GPU with bf16; on a CPU with native
bf16 matmuls, only where the module's linears are measured faster in it. Timings are faked here, so what a test
expects never depends on the CI machine's CPU."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from specdec import models
from specdec.errors import SpecDecError


def _timed(monkeypatch, native: bool, bf16: float, fp32: float = 1.0) -> list:
    """A CPU with (or without) native bf16 whose measured seconds are ``bf16`` and ``fp32``, nothing decided yet;
    returns ``{(out, in): how many}`` for each measurement asked for."""
    asked = []

    def seconds(weights, dtypes):
        asked.append({shape: count for shape, (_, count) in weights.items()})
        return {dt: bf16 if dt == torch.bfloat16 else fp32 for dt in dtypes}

    monkeypatch.setattr(models, "cpu_has_bf16", lambda: native)
    monkeypatch.setattr(models, "_dtype_seconds", seconds)
    monkeypatch.setattr(models, "_DECIDED", {})  # undone after
    return asked


def test_auto_takes_bf16_on_a_cpu_only_where_it_measures_faster(monkeypatch):
    module = nn.Sequential(nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 64))
    asked = _timed(monkeypatch, native=True, bf16=0.5)
    assert models.auto_dtype(module, "cpu", torch.float32) == torch.bfloat16
    assert asked == [{(16, 8): 2, (64, 16): 1}]  # every linear shape, with how many the module has
    assert models.auto_dtype(module, "cpu", torch.float32) == torch.bfloat16 and len(asked) == 1  # cached
    _timed(monkeypatch, native=True, bf16=0.9)  # faster, but not by the margin
    assert models.auto_dtype(module, "cpu", torch.float32) == torch.float32
    asked = _timed(monkeypatch, native=False, bf16=0.1)  # no native bf16: not even timed
    assert models.auto_dtype(module, "cpu", torch.float32) == torch.float32 and asked == []
    asked = _timed(monkeypatch, native=True, bf16=0.1)
    assert models.auto_dtype(nn.LayerNorm(4), "cpu", torch.float32) == torch.float32 and asked == []  # no linears
    assert models.auto_dtype(module, "cpu", torch.bfloat16) == torch.bfloat16 and asked == []  # already bf16


def test_auto_on_a_gpu_with_bf16_is_bf16_untimed(monkeypatch):
    asked = _timed(monkeypatch, native=True, bf16=2.0)
    monkeypatch.setattr(models, "has_native_bf16", lambda device: True)  # a bf16 GPU, and a CPU with native bf16
    assert models.auto_dtype(nn.Linear(4, 4), "cuda", torch.float32) == torch.bfloat16 and asked == []
    assert models.resolve_draft_dtype("auto", "float32", "cuda") == "bfloat16"  # loaded in bf16 directly
    assert models.resolve_draft_dtype("auto", "float32", "cpu") == "float32"  # loaded as the target, then measured


def test_the_measured_seconds_weigh_each_shape_by_its_count(monkeypatch):
    """One F.linear per shape, row count and dtype is timed, by the module's own weights (a copy in the other
    dtype); a shape's time counts as often as the module has it."""
    timed = []

    def fastest(calls, reps=7):
        timed.extend(calls)
        for call in calls.values():
            call()  # the calls run: a wrong shape would raise here
        return dict.fromkeys(calls, 1.0)

    monkeypatch.setattr("specdec.timing.fastest_seconds", fastest)
    module = nn.Sequential(nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 64))
    weights = models.matmul_weights(module)
    assert weights[16, 8][0] is module[0].weight and weights[64, 16][0] is module[2].weight
    seconds = models._dtype_seconds(weights, (torch.float32, torch.bfloat16))
    rows = len(models.AUTO_BF16_ROWS)
    assert seconds == {torch.float32: 3.0 * rows, torch.bfloat16: 3.0 * rows}
    assert len(timed) == 2 * rows * 2


def test_an_lm_head_over_a_draft_vocabulary_is_timed_too():
    """A padded draft's LM head and an EAGLE head's draft-vocabulary head are no nn.Linear; they are the largest
    products, and the ones bf16 speeds up most: auto times them as well."""
    from drafters.eagle_heads import EagleHead
    from drafters.vocab_padding import padded_to

    target, draft, _ = models.tiny_random_pair()
    rows, hidden = draft.get_output_embeddings().weight.shape
    assert (rows, hidden) in models.matmul_weights(padded_to(draft, rows + 8))
    for version in ("eagle2", "eagle3"):
        head = EagleHead.for_target(target, version, draft_vocab=torch.arange(40))
        assert (40, target.config.hidden_size) in models.matmul_weights(head), version


def test_fastest_seconds_times_every_call_in_turns():
    from specdec.timing import fastest_seconds

    order = []
    best = fastest_seconds({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, reps=3)
    assert order == ["a", "b"] * 4  # one untimed round, then three timed ones, taking turns
    assert set(best) == {"a", "b"} and all(s >= 0 for s in best.values())


@pytest.mark.parametrize(("bf16", "want"), [(0.5, torch.bfloat16), (0.9, torch.float32)])
def test_load_models_runs_an_auto_draft_in_the_measured_dtype(saved_tiny_pair, monkeypatch, bf16, want):
    """auto casts the draft to the dtype it measured faster; a bf16 draft so cast is the draft ``draft_dtype=
    bfloat16`` loads (rotary frequencies float32, same logits: a trial found a sampled batch drafting other tokens
    than batch 1 where auto had rounded them), and the target stays as it was."""
    from experiments.models_from_config import load_models

    asked = _timed(monkeypatch, native=True, bf16=bf16)
    cfg = {"source": "hf", "target": str(saved_tiny_pair / "target"), "draft": str(saved_tiny_pair / "draft"),
           "draft_dtype": "auto", "narrow_linears": "off"}
    loaded = load_models(cfg)
    assert next(loaded.draft.parameters()).dtype == want and loaded.draft.dtype == want
    assert loaded.info["draft_dtype"] == str(want).removeprefix("torch.")
    assert next(loaded.target.parameters()).dtype == torch.float32 and len(asked) == 1
    shapes = {tuple(m.weight.shape) for m in loaded.draft.modules() if isinstance(m, nn.Linear)}
    assert set(asked[0]) == shapes  # the draft's linears were measured, not the target's
    if want == torch.bfloat16:  # the same draft as one loaded in bf16: its rotary frequencies stay float32
        named = load_models({**cfg, "draft_dtype": "bfloat16"}).draft
        assert all(b.dtype == torch.float32 for n, b in loaded.draft.named_buffers() if n.endswith("inv_freq"))
        ids = torch.arange(3, 40)[None]  # [1, 37]
        with torch.no_grad():
            assert torch.equal(loaded.draft(ids).logits, named(ids).logits)
    with pytest.raises(SpecDecError, match=r"model.draft_dtype='bf16' is unknown"):
        load_models({**cfg, "draft_dtype": "bf16"})


def test_a_padded_draft_is_measured_and_cast_before_padding(tmp_path, monkeypatch):
    """A draft whose LM head has fewer rows than the target's (same tokenizer) is padded after auto decided: its LM
    head was timed as the nn.Linear it still was, and the padded view's head reads the bf16 weight in place (a
    view, not a second copy of the largest matrix)."""
    from drafters.draft_vocab import DraftVocabHead
    from experiments.models_from_config import load_models
    from tests.test_vocab_padding import padded_pair

    target, draft = padded_pair.__wrapped__()
    for name, model in (("target", target), ("draft", draft)):
        model.save_pretrained(tmp_path / name)
        models.byte_tokenizer().save_pretrained(tmp_path / name)
    asked = _timed(monkeypatch, native=True, bf16=0.5)
    loaded = load_models({"source": "hf", "target": str(tmp_path / "target"), "draft": str(tmp_path / "draft"),
                          "draft_dtype": "auto", "narrow_linears": "off"})
    assert loaded.info["draft_vocab_padded"] == {"draft": 272, "target": 320} and loaded.info["draft_dtype"] == "bfloat16"
    assert tuple(draft.get_output_embeddings().weight.shape) in asked[0]  # the LM head, timed
    head = next(m for m in loaded.draft.modules() if isinstance(m, DraftVocabHead))
    assert head.rows.dtype == torch.bfloat16 and head.rows._is_view()  # cast after padding: a copy, not a view


def test_a_resumed_run_drafts_in_the_dtype_auto_picked_before(tmp_path):
    """``draft_dtype=auto`` decides per process; a resumed run drafts in the dtype its kept records were drafted in
    (the earlier summary's ``models.draft_dtype``), so a sampled run's tokens do not depend on where it was cut
    (a trial saw a resumed run mix a float32 and a bf16 draft). An explicit dtype, or nothing kept, is left alone."""
    import json

    from omegaconf import OmegaConf

    from experiments.resume import pinned_model, prepare

    config = {"seed": 0, "model": {"draft_dtype": "auto"}}
    (tmp_path / "summary.json").write_text(json.dumps({"status": "interrupted", "config": config,
                                                       "models": {"draft_dtype": "bfloat16"}}))
    records = [{"question_id": 0, "method": m, "stats": {}} for m in ("speculative", "baseline")]
    (tmp_path / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    state = prepare(tmp_path, config, ["speculative", "baseline"], [0, 1])
    model, line = pinned_model(OmegaConf.create({"source": "zoo", "draft_dtype": "auto"}), state)
    assert model == {"source": "zoo", "draft_dtype": "bfloat16"} and "drafting in bfloat16" in line
    explicit = OmegaConf.create({"draft_dtype": "float32"})
    assert pinned_model(explicit, state) == (explicit, None)
    fresh = prepare(tmp_path / "new", config, ["speculative", "baseline"], [0, 1])  # nothing kept: auto decides
    auto = OmegaConf.create({"draft_dtype": "auto"})
    assert fresh.models == {} and pinned_model(auto, fresh) == (auto, None)


def test_only_an_auto_head_that_ran_is_pinned():
    """:func:`experiments.resume.pinned_drafter` pins ``dtype=auto`` of the node the summary's ``drafter_shape``
    describes (a hybrid's second part), and only where a head ran (``draft_module: probe``; a draft model's dtype is
    ``model.draft_dtype``'s) and records were kept; an explicit dtype is left alone."""
    from omegaconf import OmegaConf

    from experiments.resume import ResumeState, pinned_drafter

    head = ResumeState(drafter_shape={"draft_dtype": "bfloat16", "draft_module": "probe"})
    eagle = OmegaConf.create({"_target_": "drafters.EagleDrafter", "dtype": "auto"})
    pinned, line = pinned_drafter(eagle, head)
    assert pinned.dtype == "bfloat16" and eagle.dtype == "auto" and line.startswith("drafter.dtype=auto")
    hybrid = OmegaConf.create({"_target_": "drafters.HybridDrafter", "first": {"_target_": "drafters.NGramDrafter"},
                               "second": {"_target_": "drafters.EagleDrafter", "dtype": "auto"}})
    pinned, line = pinned_drafter(hybrid, head)
    assert pinned.second.dtype == "bfloat16" and line.startswith("drafter.second.dtype=auto")
    assert hybrid.second.dtype == "auto"
    explicit = OmegaConf.create({"_target_": "drafters.EagleDrafter", "dtype": "float32"})
    model = ResumeState(drafter_shape={"draft_dtype": "bfloat16", "draft_module": "model"})
    for cfg, state in ((explicit, head), (eagle, model), (eagle, ResumeState())):
        assert pinned_drafter(cfg, state) == (cfg, None)
    plain = {"_target_": "drafters.EagleDrafter", "dtype": "auto"}  # the Python API's dict
    assert pinned_drafter(plain, head)[0] == {**plain, "dtype": "bfloat16"} and plain["dtype"] == "auto"



def cut_and_resumed(cfg, tmp_path, monkeypatch) -> tuple[dict, dict, list[dict]]:
    """``decode.run(cfg)`` whole with ``auto`` picking bfloat16 (``specdec.models.auto_dtype`` patched), then again
    from a copy cut after prompt 0 (an interrupted run) with ``auto`` picking float32: the two summaries and each
    run's tokens by ``(question_id, method)``."""
    import json

    import specdec.models
    from experiments import decode
    from experiments.loggers import NoLogger

    def run_picking(dtype, run_dir):
        monkeypatch.setattr(specdec.models, "auto_dtype", lambda *args, **kwargs: dtype)
        return decode.run(cfg, run_dir, logger=NoLogger())

    def tokens(run_dir):
        records = map(json.loads, (run_dir / "records.jsonl").read_text().splitlines())
        return {(r["question_id"], r["method"]): r["tokens"] for r in records}

    whole = run_picking(torch.bfloat16, tmp_path / "whole")
    lines = (tmp_path / "whole" / "records.jsonl").read_text().splitlines()
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "records.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["question_id"] == 0))
    (cut / "summary.json").write_text(json.dumps({**whole, "status": "interrupted"}))
    resumed = run_picking(torch.float32, cut)
    return whole, resumed, [tokens(tmp_path / "whole"), tokens(cut)]


def test_a_resumed_run_loads_the_draft_in_the_dtype_auto_picked_before(tmp_path, monkeypatch):
    """:func:`experiments.resume.pinned_model` through a whole ``decode.run`` resume: the interrupted run's last
    prompt is drafted in the dtype the first process's ``model.draft_dtype=auto`` picked, though this process's
    auto would pick another, and decodes to the uninterrupted run's tokens."""
    from tests.test_medusa import compose_decode

    cfg = compose_decode("model=zoo_micro", "drafter=draft_model", "model.draft_dtype=auto", "sampling.temperature=1.0",
                         "acceptance=rejection", "num_prompts=2", "max_new_tokens=12", "warmup=0", "logger=none",
                         "costs=false")
    whole, resumed, tokens = cut_and_resumed(cfg, tmp_path, monkeypatch)
    assert whole["models"]["draft_dtype"] == "bfloat16" and tokens[0] == tokens[1]
    assert resumed["models"]["draft_dtype"] == "bfloat16" and resumed["resumed_prompts"] == 1
