"""Where the fixed-shape step's forward spends its time: each way of running it against the read floor,
and the kernels one forward launches.

    python -m experiments.step_profile --synthetic llama-8b --device cuda --context 4096 --widths 1,64 \\
        --variants graph-sdpa,graph-triton,inductor-triton --profile graph-sdpa

A variant is ``<compile>-<backend>``: ``graph`` (the eager forward captured in a CUDA graph) or ``inductor``
(compiled by ``torch.compile``, then captured), with attention through ``sdpa`` (a key mask over the whole
capacity) or ``triton`` (the tree kernel on the device-side lengths); a ``-fused`` suffix fuses the target's
q/k/v and gate/up projections (:mod:`verifier.fused_projections`; in place, so fused variants run after the
others). For each it prints the forward's time per width (:func:`experiments.captured_costs.static_curve`),
T(1) over the read floor (weights and KV at the measured copy bandwidth), the widest width over width 1, and
the seconds spent compiling and capturing. ``--profile VARIANT`` adds that variant's kernels, uncaptured
(``torch.profiler``; compiled for ``inductor``): per kernel its calls and device time in one forward of width
1, so that the gap between the summed kernel time and the floor has names. The table is written after every
variant (``--markdown``, ``--json``). Importable without hydra or wandb; random weights
(``experiments.synthetic``): timings only.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from experiments import cli
from experiments.captured_costs import _median_s, copy_bandwidth, read_floor_s, static_forwards
from specdec.errors import ConfigError
from verifier.fused_projections import fuse_projections

VARIANTS = tuple(f"{c}-{b}{f}" for f in ("", "-fused") for c in ("graph", "inductor") for b in ("sdpa", "triton"))


def variant(text: str) -> tuple[str, str, bool]:
    """``"inductor-triton-fused"`` -> ``("inductor", "triton", True)``."""
    if text not in VARIANTS:
        raise argparse.ArgumentTypeError(f"variant {text!r} is unknown; choose from {', '.join(VARIANTS)}")
    compile_mode, backend, *fused = text.split("-")
    return compile_mode, backend, bool(fused)


def time_variant(model, context: int, widths: tuple[int, ...], compile_mode: str, backend: str, reps: int) -> dict:
    """Seconds per width of one variant's forward, whether it replayed from a graph, and the seconds that
    compiling and capturing took (all widths)."""
    device = next(model.parameters()).device
    curve, captured, setup, start = {}, True, 0.0, time.perf_counter()
    for w, run, replayed in static_forwards(model, context, widths, compile_mode, backend):
        setup += time.perf_counter() - start
        curve[w], captured = _median_s(run, device, reps), captured and replayed
        start = time.perf_counter()
    return {"curve": curve, "captured": captured, "setup_s": setup}


def kernel_table(model, context: int, compile_mode: str, backend: str, fused: bool,
                 top: int) -> tuple[list[dict], int, float]:
    """The kernels of one uncaptured width-1 forward (after a warm-up; ``inductor``: compiled): the ``top`` by
    device time as rows ``{name, calls, us}``, the number of launches and their summed device seconds."""
    from torch.profiler import ProfilerActivity, profile

    if fused:
        fuse_projections(model)
    device = next(model.parameters()).device
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    for _, run, _ in static_forwards(model, context, (1,), compile_mode, backend, capture=False):  # kernels one by one
        run()
        with profile(activities=activities) as prof:
            run()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    field = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"  # CPU: its ops

    def us(event) -> float:
        return float(getattr(event, field, 0.0))

    events = sorted((e for e in prof.key_averages() if us(e) > 0), key=us, reverse=True)
    rows = [{"name": e.key[:90], "calls": e.count, "us": us(e)} for e in events[:top]]
    return rows, sum(e.count for e in events), sum(us(e) for e in events) * 1e-6


def markdown(results: dict, widths: tuple[int, ...], floor_s: float) -> str:
    """The variants' table (and the profiled kernels, if any)."""
    narrow, wide = widths[0], widths[-1]
    lines = ["| variant | " + " | ".join(f"T(w{w}) ms" for w in widths)
             + f" | T(w{narrow}) / read floor | T(w{wide}) / T(w{narrow}) | compile + capture s | captured |",
             "|" + "---|" * (len(widths) + 5)]
    for name, r in results["variants"].items():
        c = r["curve"]
        lines.append(f"| {name} | " + " | ".join(f"{c[w] * 1e3:.2f}" for w in widths)
                     + f" | {c[widths[0]] / floor_s:.2f} | {c[wide] / c[widths[0]]:.2f} | {r['setup_s']:.0f} | "
                     + ("yes" if r["captured"] else "no") + " |")
    prof = results.get("profile")
    if prof:
        summary = (f"Kernels of one uncaptured width-1 forward ({prof['variant']}): {prof['launches']} launches, "
                   f"{prof['device_s'] * 1e3:.2f} ms of device time summed (read floor {floor_s * 1e3:.2f} ms).")
        lines += ["", summary, "", "| kernel | calls | device us | us per call |", "|---|---|---|---|"]
        lines += [f"| `{k['name']}` | {k['calls']} | {k['us']:.0f} | {k['us'] / k['calls']:.1f} |"
                  for k in prof["kernels"]]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    from experiments.synthetic import SHAPES

    p = cli.ArgumentParser(prog="python -m experiments.step_profile", description=__doc__.split("\n")[0])
    p.add_argument("--synthetic", default="llama-8b", choices=sorted(SHAPES), help="the target's shape")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--context", type=cli.int_at_least(1), default=4096)
    p.add_argument("--widths", type=lambda s: tuple(sorted(set(cli.ints_at_least(1)(s)))), default=(1, 64))
    p.add_argument("--variants", type=lambda s: [variant(v) for v in s.split(",") if v],
                   default=[variant("graph-sdpa"), variant("graph-triton")])
    p.add_argument("--profile", type=variant, default=None, help="also list this variant's kernels (uncaptured)")
    p.add_argument("--top", type=cli.int_at_least(1), default=15)
    p.add_argument("--reps", type=cli.int_at_least(1), default=10)
    p.add_argument("--markdown", type=cli.output_file, help="write the tables here (after every variant)")
    p.add_argument("--json", type=cli.output_file, help="write raw results here (after every variant)")
    args = p.parse_args(argv)
    if args.profile and not args.profile[2] and any(fused for _, _, fused in args.variants):
        p.error("--profile of an unfused variant cannot follow fused --variants (fusing is in place): profile a "
                "-fused variant, or run the unfused ones alone")
    return args


def _publish(results: dict, args, floor_s: float) -> str:
    text = markdown(results, args.widths, floor_s)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(results["header"] + "\n\n" + text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return text


@cli.guard()
def main(argv=None) -> int:
    from experiments.synthetic import synthetic_pair
    from verifier.availability import check_attn_backend

    args = parse_args(argv)
    for _, backend, _ in args.variants + ([args.profile] if args.profile else []):
        try:  # one error line before the model is built
            check_attn_backend(backend, args.device)
        except ConfigError as err:
            raise ConfigError(f"{err}: here, variants ending in -sdpa (--variants graph-sdpa,inductor-sdpa)") from err
    target, _ = synthetic_pair(args.synthetic, args.device, getattr(torch, args.dtype))
    device = next(target.parameters()).device
    floor_s = read_floor_s(target, args.context, copy_bandwidth(device))
    results = {"header": f"Command: `python -m experiments.step_profile {' '.join(sys.argv[1:] if argv is None else argv)}`"
                         f"\n\nSynthetic {args.synthetic} in {args.dtype} on {device}, context {args.context}: "
                         f"read floor {floor_s * 1e3:.2f} ms.", "floor_s": floor_s, "variants": {}}
    for compile_mode, backend, fused in sorted(args.variants, key=lambda v: v[2]):  # fusing is for good: last
        if fused:
            fuse_projections(target)
        results["variants"][f"{compile_mode}-{backend}{'-fused' if fused else ''}"] = time_variant(
            target, args.context, args.widths, compile_mode, backend, args.reps)
        _publish(results, args, floor_s)
    if args.profile:
        kernels, launches, device_s = kernel_table(target, args.context, *args.profile, args.top)
        name = "-".join(args.profile[:2]) + ("-fused" if args.profile[2] else "")
        results["profile"] = {"variant": name, "kernels": kernels, "launches": launches,
                              "device_s": device_s}
    print(results["header"] + "\n\n" + _publish(results, args, floor_s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
