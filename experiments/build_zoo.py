"""Build (or reuse) the embedded target/draft pair into the cache.

Run ``python -m experiments.build_zoo`` (defaults in ``conf/build_zoo.yaml``), e.g.::

    python -m experiments.build_zoo size=micro
    python -m experiments.build_zoo size=default threads=2 logger=none
    python -m experiments.build_zoo size=default force=true cache_dir=/data/specdec

A second call finds the cached pair and says "already built". Training losses go to
``train_log.jsonl`` in the Hydra run directory and to W&B (offline by default); the
final metrics to ``metrics.json`` there and to the pair's ``COMPLETE.json``. Input errors
(unwritable cache dir, unknown size, invalid cached pair with ``on_corrupt=error``) print
``error: <message>`` and exit with status 2.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments import cli
from experiments.loggers import TrainingLog, training_wandb_settings
from experiments.zoo import ensure_pair

log = logging.getLogger(__name__)


def build(cfg: DictConfig, run_dir: Path) -> dict:
    """Ensure the pair of ``cfg.size`` exists; returns a summary (paths and metrics)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    train_log = TrainingLog(run_dir, training_wandb_settings(cfg, run_dir, "build_zoo", tags=[str(cfg.size)],
                                                         name=f"build_zoo-{cfg.size}"))
    try:
        pair = ensure_pair(
            size=cfg.size,
            cache_dir=cfg.cache_dir,
            force=cfg.force,
            on_corrupt=cfg.on_corrupt,
            checksums=cfg.checksums,
            seed=cfg.seed,
            device=cfg.device,
            precision=cfg.precision,
            threads=cfg.threads,
            progress=cfg.progress,
            log_fn=train_log,
        )
        train_log.summary(pair.metrics)
    finally:
        train_log.finish()
    summary = {"size": pair.size, "root": pair.root, "target_dir": pair.target_dir, "draft_dir": pair.draft_dir,
               "tokenizer_dir": pair.tokenizer_dir, "metrics": pair.metrics}
    (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


@cli.hydra_main("build_zoo", interrupted="the same command goes on from the build's last checkpoint")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors follow :mod:`experiments.cli` (``error: ...``, exit status 2)."""
    summary = build(cfg, Path(HydraConfig.get().runtime.output_dir))
    metrics = summary["metrics"]
    print(f"zoo {summary['size']} ready at {summary['root']}")
    for key in ("target_params", "draft_params", "target_heldout_loss", "draft_heldout_loss", "alpha", "build_s"):
        if key in metrics:
            print(f"  {key}: {metrics[key]:.4g}" if isinstance(metrics[key], float) else f"  {key}: {metrics[key]}")


if __name__ == "__main__":
    main()
