"""Train Medusa heads on a frozen target by self-distillation on the standard-library corpus.

Run ``python -m experiments.train_medusa`` (defaults in ``conf/train_medusa.yaml``), e.g.::

    python -m experiments.train_medusa                          # the embedded default pair's target
    python -m experiments.train_medusa zoo_size=micro steps=100 threads=2
    python -m experiments.train_medusa target=/path/to/model out_dir=/path/to/heads loss=hard

Labels are the target's own predictions on the corpus' training split: head ``i`` at position
``t`` learns the target's distribution at position ``t + i + 1`` (``loss=soft``, KL) or its argmax
(``loss=hard``, cross-entropy); head ``i``'s loss is weighted by ``head_decay ** i``. With
``generated_rows`` > 0, a ``generated_fraction`` of every batch is text the target wrote itself
(training prompts continued by it, Medusa-2-style self-distillation data): decoding feeds the heads
the target's own output, which teacher-forced corpus text does not show. AdamW with a linear
warm-up then cosine decay. Every ``checkpoint_every`` steps a checkpoint (heads + optimizer)
is written atomically to ``<out_dir>/checkpoint.pt``; a rerun with the same settings resumes from
it (``resume=false`` starts over). At the end the heads go to ``<out_dir>`` (``drafters.medusa_heads``
format) with ``eval.json``: per-head top-1 / top-5 / per-rank accuracy on held-out text, measured
against the target's own greedy predictions, and (``generated``) the same on held-out prompts
continued greedily by the target: the greedy decode regime, whose rank accuracies shape the
default tree. Losses go to ``train_log.jsonl`` in the Hydra run directory and to W&B (offline by
default; a failure is reported and training carries on).

The loop, data, checkpoints and logs are :func:`experiments.head_training.train`'s; Medusa's loss,
evaluation and files are :class:`experiments.medusa_training.MedusaRecipe`'s.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from experiments import cli, head_training
from experiments.medusa_training import MedusaRecipe


def train(cfg: DictConfig, run_dir: str | Path, on_step=None) -> dict:
    """Train (or resume training) heads as ``cfg`` says; returns the eval report written next to them.

    ``on_step(step)`` is called after every optimizer step (tests interrupt training from it).
    """
    return head_training.train(cfg, run_dir, MedusaRecipe(cfg), on_step)


def format_report(report: dict) -> str:
    """The per-head accuracy tables printed at the end of training."""
    lines = []
    for title, part in (("held-out text", report), ("held-out prompts continued greedily by the target",
                                                    report.get("generated"))):
        if not part:
            continue
        lines += [f"{title}:", f"{'head':>4} {'top-1':>7} {'top-5':>7} {'majority':>9} {'next-token':>11}"]
        for h in part["per_head"]:
            lines.append(f"{h['head']:>4} {h['top1']:7.3f} {h['top5']:7.3f} {h['majority_top1']:9.3f} "
                         f"{h['next_token_top1']:11.3f}")
    return "\n".join(lines)


@cli.hydra_main("train_medusa", interrupted="training goes on from its last checkpoint when the same command is rerun")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors follow :mod:`experiments.cli` (``error: ...``, exit status 2)."""
    report = head_training.train_from_hydra(cfg, MedusaRecipe(cfg), format_report)
    print(f"heads {'already at' if report.get('reused') else 'and eval.json written to'} {report['out_dir']}")


if __name__ == "__main__":
    main()
