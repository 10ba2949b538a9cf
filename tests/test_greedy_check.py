"""Greedy up to rounding (experiments.greedy_check): the check that bf16 benchmark rows carry, and the
lookup of heads trained on a float32 target from the same target loaded in bf16."""
from __future__ import annotations

import copy
import json

import torch

from drafters import DraftModelDrafter
from experiments.greedy_check import (
    TOLERANCE,
    deficits,
    float32_reference,
    greedy_deficit,
)
from specdec import SamplingParams, SpeculativeDecoder
from tests.tiny_models import _with_noise, peaky_pair


def _bf16_pair():
    target, _ = peaky_pair(vocab=32, scale=30.0)
    return target.to(torch.bfloat16).eval(), _with_noise(target, 0.3, seed=2).to(torch.bfloat16).eval()


def test_float32_reference_is_a_float32_copy_of_the_same_weights():
    target, _ = _bf16_pair()
    ref = float32_reference(target)
    assert ref is not target and ref.get_output_embeddings().weight.dtype == torch.float32
    assert target.get_output_embeddings().weight.dtype == torch.bfloat16  # the original is left as it was
    assert torch.equal(ref.get_output_embeddings().weight, target.get_output_embeddings().weight.float())
    fp32 = copy.deepcopy(target).float()
    assert float32_reference(fp32) is fp32


def test_bf16_speculative_output_is_greedy_up_to_rounding_and_a_wrong_token_is_not():
    target, draft = _bf16_pair()
    ref = float32_reference(target)
    prompt = torch.tensor([[1, 5, 9, 2, 7]])
    decoder = SpeculativeDecoder(target=target, drafter=DraftModelDrafter(draft, 3), acceptance="greedy",
                                 sampling=SamplingParams())
    out = decoder.generate(prompt, max_new_tokens=24, seed=0)
    assert out.stats.draft_acceptance_rate > 0  # drafts were accepted, so verifies wider than one token ran
    seq = out.sequences  # [1, 5 + 24]
    assert greedy_deficit(ref, seq, prompt.shape[1]) <= TOLERANCE
    # plant the target's least likely token at one position: its deficit is whole logits
    with torch.inference_mode():
        z = ref(input_ids=seq[:, :12]).logits[0, -1]  # [V]: the logits for position 12
    bad = seq.clone()
    bad[0, 12] = int(z.argmin())
    assert greedy_deficit(ref, bad, prompt.shape[1]) > 1.0
    assert deficits(ref, {0: seq, 1: bad}, [prompt, prompt])[1] > 1.0
    assert greedy_deficit(ref, prompt, prompt.shape[1]) == 0.0  # nothing generated


def test_heads_named_by_the_float32_fingerprint_are_found_from_a_bf16_target(tmp_path):
    from drafters.head_files import target_fingerprint
    from experiments.bench_suite_inputs import cached_heads

    target, other = peaky_pair(vocab=32, seed=0)[0], peaky_pair(vocab=32, seed=5)[0]
    info = target_fingerprint(target)
    heads = tmp_path / f"model-{info['sha256'][:10]}"
    heads.mkdir()
    (heads / "config.json").write_text(json.dumps({"target": info}))
    (tmp_path / "model-unrelated").mkdir()  # a directory without a config is skipped
    assert cached_heads(tmp_path, "model", "config.json", target) == heads
    half = copy.deepcopy(target).to(torch.bfloat16)
    assert target_fingerprint(half)["sha256"] != info["sha256"]
    assert cached_heads(tmp_path, "model", "config.json", half) == heads
    assert cached_heads(tmp_path, "model", "config.json", other) is None


def test_a_decode_run_in_bf16_reports_whether_differing_outputs_are_greedy_up_to_rounding():
    """``experiments.decode``'s summary: for a reduced-precision target whose outputs differ from the baseline's,
    the largest greedy deficit over them and the verdict; nothing for float32 or when nothing differs."""
    from experiments.greedy_check import rounding_check
    from experiments.results import format_table

    target, draft = _bf16_pair()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    out = SpeculativeDecoder(target=target, drafter=DraftModelDrafter(draft, 3), acceptance="greedy",
                             sampling=SamplingParams()).generate(prompt, max_new_tokens=16, seed=0)
    new = out.sequences[0, prompt.shape[1]:].tolist()
    good = rounding_check(target, {"q": prompt}, {"q": new}, ["q"])
    assert good["greedy_up_to_rounding"] and good["greedy_deficit"] <= TOLERANCE
    with torch.inference_mode():
        z = float32_reference(target)(input_ids=out.sequences[:, :8]).logits[0, -1]  # [V]: position 8's logits
    wrong = new[:3] + [int(z.argmin())] + new[4:]
    bad = rounding_check(target, {"q": prompt}, {"q": wrong}, ["q"])
    assert not bad["greedy_up_to_rounding"] and bad["greedy_deficit"] > 1.0
    assert rounding_check(target, {"q": prompt}, {"q": new}, []) == {}
    assert rounding_check(copy.deepcopy(target).float(), {"q": prompt}, {"q": new}, ["q"]) == {}
    assert "NOT greedy" in format_table({"metrics": {"matches_baseline": False, **bad}})  # beside matches_baseline
    assert "greedy up to rounding" in format_table({"metrics": {"matches_baseline": False, **good}})


def test_the_verdict_covers_every_differing_prompt_and_one_whole_logit_is_not_rounding(monkeypatch):
    """``rounding_check`` reports the largest deficit over all the prompts it is given (a wrong token in the first of
    two outputs is not hidden by a right second one), counts a deficit of exactly the tolerance as rounding, and one of
    a whole logit as not (the deficits are given here: what is pinned is how they are combined and judged)."""
    from experiments import greedy_check

    target, _ = _bf16_pair()
    prompts, outputs = {"a": torch.tensor([[1, 2]]), "b": torch.tensor([[3, 4]])}, {"a": [5, 6], "b": [7, 8]}
    for found, worst, verdict in (([1.0, 0.1], 1.0, False), ([0.2, TOLERANCE], TOLERANCE, True)):
        values = iter(found)  # the deficits of prompts a and b, in that order
        monkeypatch.setattr(greedy_check, "greedy_deficit", lambda *args, values=values: next(values))
        got = greedy_check.rounding_check(target, prompts, outputs, ["a", "b"])
        assert got == {"greedy_deficit": worst, "greedy_up_to_rounding": verdict}
