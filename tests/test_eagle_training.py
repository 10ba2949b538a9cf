"""EAGLE training (experiments.train_eagle) on the micro zoo target: the report, decoding with the trained
head, resume after an interruption, the training-time-test mask, and the cost model with an EAGLE head."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from drafters import EagleDrafter
from drafters.eagle_heads import EagleHead, load_head
from experiments.eagle_training import ttt_mask, unroll
from specdec.errors import ConfigError
from tests.greedy import check_greedy, greedy_cases
from tests.tiny_models import pair, prompts
from tests.training_checks import assert_finished_head_is_reused, assert_resume_is_exact

ROOT = Path(__file__).resolve().parents[1]
MICRO_TRAIN = ["zoo_size=micro", "steps=60", "batch_size=8", "context=96", "lr=0.003", "train_chars=200000",
               "eval_tokens=2048", "eval_depth=4", "generated_rows=16", "eval_generated_rows=4", "logger=none",
               "progress=false", "threads=1"]


def compose_train(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("train_eagle", overrides=list(overrides))


@pytest.fixture(scope="module")
def micro_eagle3(tmp_path_factory):
    """An eagle3 head trained on the micro zoo target through the CLI (60 steps, seconds)."""
    out = tmp_path_factory.mktemp("micro_eagle3")
    proc = subprocess.run([sys.executable, "-m", "experiments.train_eagle", "version=eagle3", *MICRO_TRAIN,
                           f"out_dir={out}", f"hydra.run.dir={out / 'run'}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "acceptance by depth" in proc.stdout
    return out


def test_report_has_acceptance_by_depth_for_head_and_draft(micro_eagle3):
    report = json.loads((micro_eagle3 / "eval.json").read_text())
    assert report["version"] == "eagle3" and report["depth"] == 4 and len(report["feature_layers"]) == 3
    for part in ("heldout_text", "greedy_continuations", "sampled_continuations"):
        for who in ("head", "draft_model"):
            for kind in ("greedy", "sampled"):
                rates = report[part][who][kind]["accept_rate_by_depth"]
                assert len(rates) == 4 and all(a >= b for a, b in itertools.pairwise(rates))  # chained: non-increasing
                assert report[part][who][kind]["alpha_by_depth"][0] == rates[0]
    head = report["heldout_text"]["head"]
    assert report["alpha_depth1"] == head["greedy"]["match_by_depth"][0] > 0.5  # chance is 1/512
    assert 0 < head["sampled"]["accept_rate_by_depth"][0] <= 1
    assert not (micro_eagle3 / "checkpoint.pt").exists() and (micro_eagle3 / "eagle_config.json").is_file()


def test_training_improves_on_the_untrained_head(micro_eagle3):
    """The untrained head (the target's first layer on the token alone) evaluated the same way."""
    from experiments.eagle_training import evaluate
    from experiments.head_data import token_chunks
    from experiments.zoo import ensure_pair

    tok, target, _ = ensure_pair("micro").load()
    rows = token_chunks(tok, "heldout", 40000, 96)[:8]  # [8, 96]
    match = {}
    for name, head in (("untrained", EagleHead.for_target(target, "eagle3")),
                       ("trained", load_head(micro_eagle3).bind(target))):
        tap = head.tap(target)
        match[name] = evaluate(head, target, tap, rows, 4)["head"]["greedy"]["match_by_depth"]
        tap.remove()
    assert match["trained"][0] > match["untrained"][0] + 0.02 and match["trained"][3] > match["untrained"][3]


def test_trained_head_greedy_equality_and_acceptance(micro_eagle3):
    from experiments.zoo import ensure_pair

    tok, target, _ = ensure_pair("micro").load()
    texts = ["def main():\n    ", "import os\nimport sys\n\n", "class Foo(object):\n    def __init__(self", "for i in"]
    ids = [tok(t, return_tensors="pt").input_ids for t in texts] + prompts(tok, 10, seed=2)[4:]
    cases = greedy_cases(target, ids, int(target.generation_config.eos_token_id))
    for kwargs in ({"num_speculative_tokens": 4}, {"budget": 16, "num_speculative_tokens": 5}):
        assert check_greedy(target, EagleDrafter(micro_eagle3, **kwargs), cases) > 1.3


def test_interrupted_training_resumes_from_its_checkpoint(tmp_path, capfd):
    from experiments.train_eagle import train

    small = ["zoo_size=micro", "version=eagle3", "ttt_steps=2", "feature_layers=[0,1,1]", "steps=6",  # a list: saved
             "checkpoint_every=2", "batch_size=2", "context=32", "train_chars=40000", "eval_tokens=256", "eval_depth=2",
             "generated_rows=4", "generated_prompt=8", "eval_generated_rows=2", "logger=none", "progress=false",
             "threads=1"]
    assert_resume_is_exact(train, compose_train, small, tmp_path, capfd, load_head)
    assert_finished_head_is_reused(train, compose_train, small, tmp_path, capfd, load_head)
    eagle2 = [o for o in small if not o.startswith(("version=", "ttt_steps=", "feature_layers="))] + ["version=eagle2"]
    assert_resume_is_exact(train, compose_train, eagle2, tmp_path / "eagle2", capfd, load_head)  # its feature noise too

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(compose_train(*small, f"out_dir={tmp_path / 'c'}"), tmp_path / "run_c", on_step=interrupt)
    other = [o for o in small if not o.startswith("ttt_steps")] + ["ttt_steps=3", f"out_dir={tmp_path / 'c'}"]
    with pytest.raises(ConfigError, match=r"other settings \(ttt_steps: 2 -> 3\)"):
        train(compose_train(*other), tmp_path / "run_c2")


def test_bad_training_settings_are_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "experiments.train_eagle", "version=eagle9", "zoo_size=micro",
                           "logger=none", f"hydra.run.dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "version='eagle9' is unknown" in errors[0], proc.stderr[-2000:]


# --------------------------------------------------------------------------- the unrolled head


def test_ttt_mask_and_unroll_match_chain_drafting():
    """Step j of the unrolled head equals feeding a depth-(j + 1) chain node to the head's cache."""
    assert ttt_mask(3, 0, "cpu")[0, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert ttt_mask(3, 2, "cpu")[0, 0, 1].tolist() == [True, True, False, False, True, False, False, True, False]
    target = pair("llama")[0]
    head = EagleHead.for_target(target, "eagle2", init="random").eval()
    batch = torch.randint(0, 250, (1, 9))
    feats = torch.randn(1, 8, 64)
    with torch.no_grad():
        outs = unroll(head, feats, batch, 3)
        s = 4  # root slot: pairs 0..4 with true features, then chain nodes t_6, t_7 with the head's own outputs
        z0, f0 = head(batch[:, 1 : s + 2], feats[:, : s + 1])
        z1, f1 = head(torch.cat([batch[:, 1 : s + 2], batch[:, s + 2 : s + 3]], 1),
                      torch.cat([feats[:, : s + 1], f0[:, s : s + 1]], 1))
        z2, _ = head(torch.cat([batch[:, 1 : s + 2], batch[:, s + 2 : s + 4]], 1),
                     torch.cat([feats[:, : s + 1], f0[:, s : s + 1], f1[:, -1:]], 1))
    torch.testing.assert_close(outs[0][0][0, s], z0[0, s], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[1][0][0, s], z1[0, -1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[2][0][0, s], z2[0, -1], atol=1e-4, rtol=1e-4)


def test_soft_loss_over_a_draft_vocabulary_equals_the_full_vocabulary_formula():
    """With a draft vocabulary the soft cross-entropy runs over the draft columns only (the teacher's softmax
    once per batch); it equals the full-vocabulary formula, whose other columns the head scores -inf."""
    import torch.nn.functional as F

    from drafters.draft_vocab import soft_cross_entropy
    from experiments.eagle_training import eagle_loss

    target = pair("llama")[0]
    gen = torch.Generator().manual_seed(0)
    ids = torch.randperm(target.config.vocab_size, generator=gen)[:40].sort().values  # [40]
    head = EagleHead.for_target(target, "eagle3", init="random", draft_vocab=ids)
    batch = torch.randint(0, 250, (2, 12), generator=gen)
    raw = torch.randn(2, 12, 3 * 64, generator=gen)
    t_logits = torch.randn(2, 12, target.config.vocab_size, generator=gen) * 3
    opts = options_for_eagle3()
    loss, metrics = eagle_loss(head, raw, t_logits, None, batch, opts)
    features = head.target_features(raw[:, :-1])
    expected = torch.zeros(())
    for j, (logits, _) in enumerate(unroll(head, features, batch, opts["ttt_steps"])):
        m = 11 - j
        logq = F.log_softmax(logits[:, :m].float(), dim=-1)  # [B, m, V]: -inf outside the draft vocabulary
        expected = expected + opts["ttt_decay"] ** j * soft_cross_entropy(t_logits[:, j + 1 : j + 1 + m], logq)
        top1 = float((logq.argmax(-1) == t_logits[:, j + 1 : j + 1 + m].argmax(-1)).float().mean())
        assert metrics[f"train/top1_step{j + 1}"] == top1
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert head.model.lm_head.weight.grad.abs().sum() > 0


def options_for_eagle3() -> dict:
    from omegaconf import OmegaConf

    from experiments.eagle_training import options

    cfg = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "train_eagle.yaml")
    cfg.version = "eagle3"
    return options(cfg)


# --------------------------------------------------------------------------- cost model


def test_eagle_head_is_costed(tmp_path):
    """The head runs once per tree level (its catch-up included); the probe times one head forward."""
    from experiments.costs import cost_model
    from tests.test_costs import T_TARGET, _measured_speedup_and_model, _slow

    target = _slow(pair("llama")[0], T_TARGET)
    ids_list = prompts(pair("llama")[2], 3, seed=5)
    head = EagleHead.for_target(pair("llama")[0], "eagle2")
    head.input.register_forward_pre_hook(lambda *args: time.sleep(0.003))  # once per head forward, either path
    drafter = EagleDrafter(head, num_speculative_tokens=3)
    speedup, metrics, model, stats, costs = _measured_speedup_and_model(target, drafter, ids_list, tmp_path)
    assert model["drafter"]["draft_forwards"] == "per_level" and model["drafter"]["draft_module"] == "probe"
    assert costs["draft"][1] >= 0.003
    assert 0.8 < metrics["efficiency"] < 1.2, (speedup, metrics)
    free, _ = cost_model(stats, dict(costs, draft=None), model["drafter"], speedup, len(ids_list))
    assert free["predicted_speedup"] > metrics["predicted_speedup"] * 1.1
