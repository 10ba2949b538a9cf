"""Build (or reuse) the distilled draft of a real pretrained target (see :mod:`experiments.draft_training`).

Run ``python -m experiments.build_draft`` (defaults in ``conf/build_draft.yaml``), e.g.::

    python -m experiments.build_draft                       # SmolLM2's draft: answers, training, evaluation
    python -m experiments.build_draft threads=2 steps=200 force=true

A second call finds the cached draft. The metrics (held-out alpha, times) go to the draft's
``COMPLETE.json`` and to ``metrics.json`` in the Hydra run directory. Input errors print
``error: <message>`` and exit with status 2.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from experiments import cli
from experiments.draft_training import DraftSettings, build_draft
from specdec.models import set_threads

log = logging.getLogger(__name__)


@cli.hydra_main("build_draft", interrupted="the target's answers so far are kept: the same command goes on from them")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; errors follow :mod:`experiments.cli` (``error: ...``, exit status 2)."""
    set_threads(cfg.threads, "threads")
    fields = DraftSettings.__dataclass_fields__
    settings = DraftSettings(**{k: cfg[k] for k in fields})
    path, manifest = build_draft(str(cfg.target), settings, cache_dir=cfg.cache_dir, force=cfg.force,
                                 progress=cfg.progress)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps({"path": str(path), **manifest.get("metrics", {})}, indent=2) + "\n")
    metrics = manifest.get("metrics", {})
    print(f"distilled draft of {cfg.target} ready at {path}")
    for key in ("draft_params", "alpha", "heldout_loss", "generate_s", "train_s", "build_s"):
        if key in metrics:
            value = metrics[key]
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")


if __name__ == "__main__":
    main()
