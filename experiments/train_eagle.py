"""Train an EAGLE head (EAGLE-1/2 or EAGLE-3) on a frozen target, on corpus text and text the target writes.

Run ``python -m experiments.train_eagle`` (defaults in ``conf/train_eagle.yaml``), e.g.::

    python -m experiments.train_eagle threads=2                    # eagle2 head for the embedded default target
    python -m experiments.train_eagle version=eagle3 threads=2     # eagle3: three layers, training-time test
    python -m experiments.train_eagle zoo_size=micro steps=50      # the micro pair (tests)
    python -m experiments.train_eagle target=/path/to/model out_dir=/path/to/head

The target's features are computed on the fly (its last hidden state, or for eagle3 three decoder
layers read with forward hooks). Losses (:mod:`experiments.eagle_training`): eagle2 regresses the
next feature (smooth L1) plus 0.1 x cross-entropy to the target's distribution, with noise on the
input features; eagle3 unrolls the head on its own outputs (``ttt_steps``) with cross-entropy
weighted ``ttt_decay ** j``. With ``generated_rows`` > 0 part of every batch is text the target
continued itself. The loop, checkpoints (``<out_dir>/checkpoint.pt``, resumed by a rerun with the
same settings), progress bar and logs (``train_log.jsonl``, W&B) are
:func:`experiments.head_training.train`'s. At the end the head goes to ``<out_dir>`` with
``eval.json``: held-out acceptance by depth against the target's greedy and sampled predictions,
next to the embedded draft model's when training on the zoo target.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from experiments import cli, head_training
from experiments.eagle_training import EagleRecipe


def train(cfg: DictConfig, run_dir: str | Path, on_step=None) -> dict:
    """Train (or resume training) a head as ``cfg`` says; returns the eval report written next to it.

    ``on_step(step)`` is called after every optimizer step (tests interrupt training from it).
    """
    return head_training.train(cfg, run_dir, EagleRecipe(cfg), on_step)


def format_report(report: dict) -> str:
    """Acceptance by depth: the head's (and the draft model's) greedy and sampled chained acceptance."""
    lines = []
    for part, title in (("heldout_text", "held-out text (teacher-forced)"),
                        ("greedy_continuations", "held-out prompts continued greedily by the target"),
                        ("sampled_continuations", "held-out prompts continued by the target at T=1")):
        if part not in report:
            continue
        drafters = [name for name in ("head", "draft_model") if name in report[part]]
        lines += [f"{title}: acceptance by depth (chained), greedy / sampled (T=1)",
                  "depth " + " ".join(f"{name:>19}" for name in drafters)]
        for d in range(report["depth"]):
            cells = [f"{report[part][n]['greedy']['accept_rate_by_depth'][d]:9.3f} /"
                     f"{report[part][n]['sampled']['accept_rate_by_depth'][d]:6.3f}  " for n in drafters]
            lines.append(f"{d + 1:>5} " + " ".join(f"{c:>19}" for c in cells))
    return "\n".join(lines)


@cli.hydra_main("train_eagle", interrupted="training goes on from its last checkpoint when the same command is rerun")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors follow :mod:`experiments.cli` (``error: ...``, exit status 2)."""
    report = head_training.train_from_hydra(cfg, EagleRecipe(cfg), format_report)
    done = "already at" if report.get("reused") else "and eval.json written to"
    print(f"{cfg.version} head (trained in {report['train_s']:.0f} s) {done} {report['out_dir']}")


if __name__ == "__main__":
    main()
