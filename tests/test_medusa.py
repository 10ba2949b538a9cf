"""Medusa heads: training (micro target, resume) and drafting (greedy equality, chi-square); bad input and configs:
:mod:`tests.test_medusa_files`.

- Greedy Medusa decoding equals ``model.generate(do_sample=False)`` for every tree preset, with random
  heads on the tiny random target and with heads trained on the micro zoo target (which accept many
  drafts); 20 prompts, EOS and ``max_new_tokens`` landing mid-tree.
- ``rejection`` with Medusa trees reproduces the target's exactly enumerated output distribution.
- A training run interrupted after its checkpoint resumes there and ends with the same heads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from drafters import MedusaDrafter
from drafters.medusa import medusa_expected_tokens, medusa_tree
from drafters.medusa_heads import (
    WEIGHTS_FILE,
    MedusaHeads,
    load_heads,
    save_heads,
)
from specdec import SamplingParams, SpeculativeDecoder
from specdec.tree import PRESET_DIR, load_preset
from tests.greedy import check_greedy, greedy_cases
from tests.lossless import (
    ALPHA,
    RUNS,
    VOCAB,
    chi_square_pvalue,
    exact_distribution,
    sample_counts,
)
from tests.tiny_models import pair, peaky_pair, prompts
from tests.training_checks import assert_finished_head_is_reused, assert_resume_is_exact

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if "paths: null" not in p.read_text())
MICRO_TRAIN = ["zoo_size=micro", "steps=80", "num_heads=3", "loss=hard", "lr=0.003", "batch_size=8", "context=128",
               "train_chars=300000", "eval_tokens=8192", "generated_rows=0", "logger=none", "progress=false",
               "threads=1"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train_medusa", overrides=list(overrides))


def compose_decode(*overrides: str):
    from experiments import decode  # noqa: F401  (registers base_config and the resolvers the config uses)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --------------------------------------------------------------------------- random heads, tiny target


@pytest.fixture(scope="module")
def tiny():
    target, _, tok = pair("llama")
    heads = MedusaHeads.for_target(target, 8, init="random", seed=0)
    return target, heads, greedy_cases(target, prompts(tok, 20, seed=1), len(tok) - 1)


@pytest.mark.parametrize("tree", PRESETS + [None])
def test_random_heads_greedy_equals_plain_decoding(tiny, tree):
    """Every tree shape over untrained heads: mostly rejections (acceptance by trained heads is checked below), but
    some drafts are accepted, so both of the greedy rule's branches run."""
    target, heads, cases = tiny
    assert check_greedy(target, MedusaDrafter(heads, tree=tree), cases) > 1.0


def test_fewer_heads_prune_the_tree_and_still_match(tiny):
    target, heads, cases = tiny
    drafter = MedusaDrafter(heads, tree="sparse60", num_heads=2)
    assert int(drafter.compiled.depth.max()) == 2 and drafter.max_nodes < 60
    check_greedy(target, drafter, cases[:6])


def test_one_token_prompt_proposes_nothing_first(tiny):
    target, heads, _ = tiny
    drafter = MedusaDrafter(heads, tree="binary")
    ids = torch.tensor([[65]])
    out = SpeculativeDecoder(target, drafter).generate(ids, 12)
    assert out.sequences.tolist() == target.generate(ids, do_sample=False, max_new_tokens=12).tolist()
    assert out.stats.proposed_per_step[0] == 0 and out.stats.proposed_per_step[1] == 30


def test_tokens_depend_on_depth_and_rank_only(tiny):
    target, heads, _ = tiny
    drafter = MedusaDrafter(heads, tree="binary")
    drafter.start(_ctx(target, drafter))
    hidden = torch.randn(1, 5, 64)
    drafter.prefill(torch.tensor([[1, 2, 3, 4, 5, 6]]), hidden[0])
    tree = drafter.propose(max_depth=3)
    assert tree.num_nodes == 14 and tree.draft_probs is None  # binary pruned to depth 3
    top = heads(hidden[0, -1], num_heads=3).topk(2, dim=-1).indices  # [3, 2]
    paths = drafter.compiled.paths
    for i in range(tree.num_nodes):
        assert int(tree.tokens[i]) == int(top[len(paths[i]) - 1, paths[i][-1]])


@pytest.mark.parametrize("accepted", [[], [0], [0, 2]])
def test_after_a_commit_the_tree_comes_from_the_last_accepted_nodes_state(tiny, accepted):
    """The next tree reads the verify forward's hidden state at the last accepted node (the root's if none
    was accepted): the state whose LM head gave the new root."""
    from specdec.types import AcceptResult, VerifyOutput

    target, heads, _ = tiny
    drafter = MedusaDrafter(heads, tree="binary")
    drafter.start(_ctx(target, drafter))
    drafter.prefill(torch.tensor([[1, 2, 3, 4, 5, 6]]), torch.randn(5, 64))
    tree = drafter.propose(max_depth=3)
    assert all(int(tree.parents[n]) == p for n, p in zip(accepted, [-1] + accepted))  # a path of the tree
    hidden = torch.randn(1 + tree.num_nodes, 64, generator=torch.Generator().manual_seed(len(accepted)))
    verify = VerifyOutput(logits=torch.zeros(1 + tree.num_nodes, heads.vocab_size), hidden=hidden)
    drafter.commit(AcceptResult(accepted_nodes=accepted, tokens=[int(tree.tokens[n]) for n in accepted] + [7]), verify)
    again = drafter.propose(max_depth=3)
    row = 1 + accepted[-1] if accepted else 0
    top = heads(hidden[row], num_heads=3).topk(2, dim=-1).indices  # [3, 2]
    paths = drafter.compiled.paths
    assert [int(t) for t in again.tokens] == [int(top[len(p) - 1, p[-1]]) for p in paths[: again.num_nodes]]


def test_an_eval_report_for_fewer_heads_than_used_falls_back_to_the_default_accuracies(tiny, tmp_path):
    """Rank accuracies measured for 1 head cannot shape a tree for 3: the tree is the fallback's, 3 deep."""
    from drafters.medusa import FALLBACK_RANK_PROBS
    from specdec.tree import best_tree

    _, heads, _ = tiny
    save_heads(heads, tmp_path, evaluation={"rank_accuracy": [[0.6, 0.2, 0.1]]})
    drafter = MedusaDrafter(str(tmp_path), num_heads=3, tree_nodes=10)
    assert drafter.tree_paths() == best_tree(FALLBACK_RANK_PROBS, 10, max_depth=3)
    assert drafter.compiled.max_depth == 3


def _ctx(target, drafter):
    from specdec.drafting import DraftContext

    return DraftContext(target, SamplingParams(), None, 64 + drafter.max_nodes)


# --------------------------------------------------------------------------- losslessness


@pytest.mark.parametrize("setting", ["t1.0", "t0.7_topk3"])
def test_rejection_with_medusa_trees_is_lossless(setting):
    target, _ = peaky_pair(VOCAB)
    sampling = {"t1.0": SamplingParams(temperature=1.0), "t0.7_topk3": SamplingParams(temperature=0.7, top_k=3)}[setting]
    heads = MedusaHeads.for_target(target, 2, init="random", seed=1)
    drafter = MedusaDrafter(heads, tree=[[0], [1], [2], [0, 0], [0, 1], [1, 0]])
    counts = sample_counts(target, drafter, "rejection", sampling)
    assert chi_square_pvalue(counts, exact_distribution(target, sampling), RUNS) > ALPHA


def test_typical_acceptance_runs_with_medusa(tiny):
    target, heads, cases = tiny
    dec = SpeculativeDecoder(target, MedusaDrafter(heads), "typical", SamplingParams(temperature=0.7))
    out = dec.generate(cases[0][0], 16, seed=0)
    assert out.stats.new_tokens == 16


# --------------------------------------------------------------------------- training on the micro target


@pytest.fixture(scope="module")
def micro_heads(tmp_path_factory):
    """Heads trained on the micro zoo target through the CLI (80 steps, a few seconds)."""
    out = tmp_path_factory.mktemp("micro_heads")
    proc = subprocess.run([sys.executable, "-m", "experiments.train_medusa", *MICRO_TRAIN, f"out_dir={out}",
                           f"hydra.run.dir={out / 'run'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_trained_heads_beat_chance_on_heldout_text(micro_heads):
    report = json.loads((micro_heads / "eval.json").read_text())
    first, second = report["per_head"][:2]
    assert first["top1"] > 50 * report["chance_top1"]
    assert first["top1"] > first["majority_top1"] + 0.03  # better than always guessing the commonest token
    assert first["top1"] > first["next_token_top1"] + 0.1  # better than the untrained (next-token) head
    assert first["top1"] > second["top1"] and first["top5"] > first["top1"]
    assert (micro_heads / WEIGHTS_FILE).is_file() and not (micro_heads / "checkpoint.pt").exists()
    generated = report["generated"]["per_head"]  # held-out prompts continued greedily by the target
    assert len(generated) == 3 and generated[0]["positions"] > 1000


def test_trained_heads_greedy_equality_and_acceptance(micro_heads):
    from experiments.zoo import ensure_pair

    tok, target, _ = ensure_pair("micro").load()
    texts = ["def main():\n    ", "import os\nimport sys\n\n", "class Foo(object):\n    def __init__(self", "for i in"]
    ids = [tok(t, return_tensors="pt").input_ids for t in texts] + prompts(tok, 16, seed=2)[4:]
    cases = greedy_cases(target, ids, int(target.generation_config.eos_token_id))
    for tree in (None, "chain4", "binary", "chain4_alts", "sparse60"):
        assert check_greedy(target, MedusaDrafter(micro_heads, tree=tree), cases) > 1.3, tree


def test_medusa_tree_tool_writes_a_preset(micro_heads, tmp_path):
    from experiments.medusa_tree import main

    assert main([str(micro_heads), "--nodes", "20", "--out-dir", str(tmp_path), "--name", "m20"]) == 0
    paths = load_preset(tmp_path / "m20.yaml")
    acc = json.loads((micro_heads / "eval.json").read_text())["generated"]["rank_accuracy"]  # the decode regime
    assert len(paths) == 20 and paths == medusa_tree(acc, 20)
    assert medusa_expected_tokens(paths, acc) >= medusa_expected_tokens(load_preset("chain4")[:3], acc)


def test_decode_entry_point_with_medusa(micro_heads, tmp_path):
    from experiments import decode
    from experiments.loggers import NoLogger

    cfg = compose_decode("model=zoo_micro", "drafter=medusa", f"drafter.heads={micro_heads}", "num_prompts=2",
                         "max_new_tokens=12", "costs=false", "warmup=0")
    summary = decode.run(cfg, tmp_path, logger=NoLogger())
    assert summary["metrics"]["matches_baseline"] is True


# --------------------------------------------------------------------------- resume


#: Six steps of two tiny heads, a checkpoint every two: the resume tests' training.
SMALL_TRAIN = [o for o in MICRO_TRAIN if not o.startswith(("steps=", "batch_size=", "context=", "train_chars=",
                                                           "eval_tokens=", "num_heads=", "generated_rows="))] + [
    "steps=6", "checkpoint_every=2", "batch_size=2", "context=32", "train_chars=40000", "eval_tokens=256",
    "num_heads=2", "generated_rows=4", "generated_prompt=8", "eval_generated_rows=2"]  # generated rows: seeded


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, capfd):
    from experiments.train_medusa import train

    assert_resume_is_exact(train, compose_train, SMALL_TRAIN, tmp_path, capfd, load_heads)
    assert_finished_head_is_reused(train, compose_train, SMALL_TRAIN, tmp_path, capfd, load_heads)


def test_a_resumed_trainings_wandb_runs_share_a_group(tmp_path, monkeypatch):
    """Each invocation started a W&B run of its own, unlinked (steps 5-305 in one, 310-535 in another): the
    checkpoint keeps the training's W&B group and a resumed training's run joins it (a run of its own: offline runs
    that share an id replace each other when synced); a fresh training gets a new group."""
    from experiments import loggers
    from experiments.train_medusa import train
    from tests.test_metrics_logged import FakeRun

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    runs = []
    monkeypatch.setattr(loggers, "start_wandb", lambda init: runs.append(FakeRun(**init)) or runs[-1])
    overrides = [o for o in SMALL_TRAIN if o != "logger=none"] + ["logger=wandb", "log_every=1", f"out_dir={tmp_path / 'h'}"]
    with pytest.raises(KeyboardInterrupt):
        train(compose_train(*overrides), tmp_path / "run_1", on_step=interrupt)
    first = runs[-1].init
    assert first["group"].startswith("medusa-") and [step for _, step in runs[-1].logged] == [1, 2, 3]
    train(compose_train(*overrides), tmp_path / "run_2")
    assert runs[-1].init["group"] == first["group"] and [step for _, step in runs[-1].logged][:2] == [3, 4]
    train(compose_train(*overrides, "force=true"), tmp_path / "run_3")
    assert runs[-1].init["group"] != first["group"]


def test_resume_refuses_a_checkpoint_with_other_settings(tmp_path):
    from experiments.train_medusa import train
    from specdec.errors import ConfigError

    keep = [o for o in MICRO_TRAIN if o.startswith(("zoo_size=", "loss=", "logger=", "progress=", "threads=",
                                                     "generated_rows="))]
    small = [*keep, "steps=4", "checkpoint_every=1", "batch_size=2", "context=32", "train_chars=40000",
             "eval_tokens=256", "eval_generated_rows=0", "num_heads=2", f"out_dir={tmp_path}"]

    def interrupt(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(compose_train(*small, "lr=0.003"), tmp_path / "r1", on_step=interrupt)
    with pytest.raises(ConfigError, match=r"other settings \(lr: 0.003 -> 0.002\)"):
        train(compose_train(*small, "lr=0.002"), tmp_path / "r2")
