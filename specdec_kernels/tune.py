"""Sweep the tree-attention kernel's launch choices per shape on a GPU (device time, CUDA-graph replay).

    python -m specdec_kernels.tune --json tune.json                 # the kernel bench's shapes, bf16
    python -m specdec_kernels.tune --hkv 8 --prefixes 16384 --ns 1  # one shape
    python -m specdec_kernels.tune --ns 1 --grid merge=kernel,fused split_rounding=up,down num_stages=3
                                                                    # other axes (keys: CONFIG_KEYS)

For every shape it times each combination of :data:`specdec_kernels.choices.CONFIG_KEYS` values in the
grid below (``block_m`` stays the default's, which follows the tree's rows; trees of more rows than one default
M-block also try one M-block of up to 256 rows, read K/V once) and prints the fastest next to
:func:`~specdec_kernels.choices.default_config`'s choice, with the fraction of peak bandwidth of each.
Compiling every variant first, in ``--jobs`` parallel processes that fill Triton's on-disk cache, keeps the
sweep within a minute or two. The JSON is written after every shape. What it finds is meant to be written into
``default_config`` (the kernel never tunes itself while decoding: a captured step cannot benchmark).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import subprocess
import sys

import torch

GRID = {"block_n": (64, 128), "num_stages": (2, 3, 4), "num_warps": (4, 8), "programs_per_sm": (1, 2, 4, 8)}


def parse_grid(items: list[str]) -> dict:
    """``--grid key=v1,v2 ...`` -> :data:`GRID` with those axes replaced: the named choices' values as given
    (:data:`~specdec_kernels.choices.CONFIG_CHOICES`), the others positive integers; ValueError otherwise."""
    from specdec_kernels.choices import CONFIG_CHOICES, CONFIG_KEYS

    grid = dict(GRID)
    for item in items:
        key, _, text = item.partition("=")
        values = [v for v in text.split(",") if v]
        if key not in CONFIG_KEYS or not values:
            raise ValueError(f"--grid {item!r}: give key=v1,v2 with a key of {list(CONFIG_KEYS)}")
        if key in CONFIG_CHOICES:
            wrong = [v for v in values if v not in CONFIG_CHOICES[key]]
            if wrong:
                raise ValueError(f"--grid {item!r}: {key} is one of {list(CONFIG_CHOICES[key])}, not {wrong[0]!r}")
            grid[key] = tuple(values)
        elif not all(v.isdigit() and int(v) > 0 for v in values):
            raise ValueError(f"--grid {item!r}: {key} takes positive integers, e.g. {key}=2,4")
        else:
            grid[key] = tuple(int(v) for v in values)
    return grid


def parse_args(argv=None):
    from experiments.cli import ArgumentParser, int_at_least, output_file  # imports neither torch nor hydra

    p = ArgumentParser(prog="python -m specdec_kernels.tune", description=__doc__.splitlines()[0])
    p.add_argument("--ns", type=int_at_least(1), nargs="+", default=[1, 8, 16, 64], help="tree sizes N")
    p.add_argument("--prefixes", type=int_at_least(1), nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--hkv", type=int_at_least(1), nargs="+", default=[8, 32], help="KV heads (Hq = 32)")
    p.add_argument("--dtype", default="bfloat16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--hq", type=int_at_least(1), default=32)
    p.add_argument("--head-dim", type=int_at_least(1), default=128)
    p.add_argument("--reps", type=int_at_least(1), default=10)
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="replace or add sweep axes, e.g. merge=kernel,fused split_rounding=up,down num_stages=3")
    p.add_argument("--flush", choices=("write", "read"), default="write", help="how L2 is flushed (see the bench)")
    p.add_argument("--jobs", type=int_at_least(1), default=min(12, os.cpu_count() or 1),
                   help="processes compiling first")
    p.add_argument("--json", type=output_file, default=None, help="write the results here (after every shape)")
    p.add_argument("--warm-part", type=int, default=None, help=argparse.SUPPRESS)  # i of --jobs: compile only
    args = p.parse_args(argv)
    try:
        args.axes = parse_grid(args.grid)  # the sweep's axes, read once
    except ValueError as err:
        p.error(str(err))
    if any(args.hq % h for h in args.hkv):
        p.error(f"--hq {args.hq} is not a multiple of every --hkv {args.hkv}: query heads come in KV-head groups")
    return args


def shapes(args):
    return list(itertools.product(args.hkv, args.prefixes, args.ns))


def configs(args, hkv: int, n: int) -> list[dict]:
    """The grid for ``hkv`` KV heads and a tree of ``n`` tokens (``block_m`` fixed by the rows)."""
    import triton

    from specdec_kernels.choices import default_config

    tree_rows = (args.hq // hkv) * n
    base = default_config(getattr(torch, args.dtype), args.head_dim, tree_rows)
    axes = args.axes
    rows = [dict(zip(axes, values)) for values in itertools.product(*axes.values())]
    grid = [{**base, **row} for row in rows]
    if tree_rows > base["block_m"]:  # also one M-block for all rows: K/V read once, more registers per program
        wide = min(256, triton.next_power_of_2(tree_rows))
        grid += [{**c, "block_m": wide, "num_warps": w} for c in grid if c["num_warps"] == 8 for w in (8, 16)]
    return grid


def time_config(case, config, reps, flush) -> float | None:
    """Device time (us) of one plan call with ``config``; None where it cannot run (e.g. out of resources)."""
    from specdec_kernels import TreeAttentionPlan
    from specdec_kernels.bench import device_time_us

    q, k, v, P, mask = case
    plan = TreeAttentionPlan(P, mask, config=config)
    try:
        plan(q, k, v)
        torch.cuda.synchronize()
    except Exception:  # noqa: BLE001 - a config the device cannot launch is skipped
        return None
    return device_time_us(lambda: plan(q, k, v), q.device, reps, flush)


def _case(args, hkv, prefix, n, device):
    from specdec_kernels.bench import binary_tree_mask, make_case

    q, k, v = make_case(1, args.hq, hkv, n, prefix, args.head_dim, getattr(torch, args.dtype), device)
    return q, k, v, prefix, binary_tree_mask(n, device)


def warm(args) -> None:
    """Compile this process's share of the distinct kernel variants (one plan call each)."""
    device = torch.device("cuda")
    # one per shape and config: the prefix, programs_per_sm and split_rounding set the split count, which
    # changes the code (one split or several, the merge's width) and Triton's integer specialisation;
    # configs that end in the same kernel find it in Triton's on-disk cache
    from specdec_kernels import TreeAttentionPlan

    jobs = [((hkv, prefix, n), c) for hkv, prefix, n in shapes(args) for c in configs(args, hkv, n)]
    made, case = None, None  # the shapes come in order: one shape's tensors at a time
    for i, (shape, config) in enumerate(jobs):
        if i % args.jobs != args.warm_part:
            continue
        if shape != made:
            made, case = shape, _case(args, *shape, device)
        try:
            TreeAttentionPlan(shape[1], case[4], config=config)(*case[:3])
        except Exception:  # noqa: BLE001 - the timing pass reports it
            pass
    torch.cuda.synchronize()


def warm_all(args) -> None:
    cmd = [sys.executable, "-m", "specdec_kernels.tune", *sys.argv[1:]]
    procs = [subprocess.Popen([*cmd, "--warm-part", str(i)]) for i in range(args.jobs)]
    for p in procs:
        p.wait()


def _pct(nbytes: int, us: float, peak_gbps: float) -> float:
    """Percent of peak bandwidth for ``nbytes`` moved in ``us`` microseconds."""
    return 100 * nbytes / (us * 1e-6) / 1e9 / peak_gbps


def main(argv=None) -> int:
    """The tune's command line. Failures follow :func:`experiments.cli.guard`: what the input caused (a flag, a
    size that runs the GPU out of memory) is one ``error:`` line with exit status 2, a bug a traceback and 1."""
    from experiments.cli import guard  # imports neither torch nor hydra

    return guard()(_main)(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: no CUDA device here: the tune times the kernel on a GPU; run it on a GPU machine "
              "(python -m specdec_kernels.bench --interpret-smoke checks the kernel on the CPU)", file=sys.stderr)
        return 2
    if args.warm_part is not None:
        warm(args)
        return 0
    from specdec_kernels.bench import default_peak_gbps, make_flush
    from specdec_kernels.choices import default_config

    if args.jobs > 1:
        warm_all(args)
    device = torch.device("cuda")
    peak = default_peak_gbps(torch.cuda.get_device_name(device)) or math.nan
    flush = make_flush(device, args.flush)
    swept = list(args.axes)
    results = []
    print(f"{'Hkv':>4} {'prefix':>6} {'N':>3} | {'default us':>10} {'bw%':>5} | {'best us':>8} {'bw%':>5} | best config")
    for hkv, prefix, n in shapes(args):
        case = _case(args, hkv, prefix, n, device)
        nbytes = case[0].element_size() * (2 * case[1].numel() + 2 * case[0].numel())
        default = default_config(case[0].dtype, args.head_dim, (args.hq // hkv) * n)
        timed = [{"config": c, "us": time_config(case, c, args.reps, flush)} for c in configs(args, hkv, n)]
        timed = [t for t in timed if t["us"]]
        best = min(timed, key=lambda t: t["us"])
        base = next((t for t in timed if t["config"] == default), None)
        base_us = base["us"] if base else time_config(case, default, args.reps, flush)
        results.append({"Hkv": hkv, "prefix": prefix, "N": n, "bytes": nbytes, "default": default,
                        "default_us": base_us, "best": best["config"], "best_us": best["us"], "all": timed})
        print(f"{hkv:>4} {prefix:>6} {n:>3} | {base_us:>10.1f} {_pct(nbytes, base_us, peak):>5.1f} | "
              f"{best['us']:>8.1f} {_pct(nbytes, best['us'], peak):>5.1f} | " + " ".join(f"{k}={best['config'][k]}" for k in swept), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(device), "peak_gbps": peak, "results": results}, f,
                          indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
