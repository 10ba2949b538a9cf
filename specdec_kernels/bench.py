"""Benchmark tree attention: the Triton kernel against SDPA and FlexAttention.

    python -m specdec_kernels.bench                       # CUDA: full sweep, prints a table
    python -m specdec_kernels.bench --json out.json       # also write the results
    python -m specdec_kernels.bench --interpret-smoke     # no GPU: one tiny case under the interpreter

Every method computes the same thing: N tree tokens (a binary tree) attending to a
fully visible prefix plus the tree under its ancestor mask. Baselines:

* ``sdpa``: ``scaled_dot_product_attention`` with a dense additive mask ``[1, 1, N, L]``;
  k/v are expanded to Hq heads for GQA *outside* the timed region (its best case).
* ``flex`` / ``flex_c``: FlexAttention eager / ``torch.compile``d, ``enable_gqa=True``,
  the block mask built once outside the timed region.

Three times per method and shape (GPU): ``call_us``, the whole eager call between CUDA events
(what a layer pays: Python launcher plus kernels); ``dev_us``, the kernels' device time alone (the
call captured once in a CUDA graph, the graph replayed between events); ``host_us``, the Python
call's own wall time with an idle queue (its host overhead). ``dev_us`` leaves out the graph's own launch
(about 8 us on an H200, as much as a small kernel): 10 calls, each after an L2 flush, sit in one graph, and a
graph of the flushes alone is subtracted. ``triton`` is the call a layer makes
in decoding (a :class:`specdec_kernels.TreeAttentionPlan` built once per step); ``triton_fused`` the same with
``merge="fused"`` (split-K merged inside the one kernel: one launch); ``triton_1x`` the one-off
:func:`specdec_kernels.tree_attention` (validation and mask packing included).

Bandwidth = bytes of K + V (the Hkv heads, read once) + Q + O over the device time, as a fraction of
``--peak-gbps`` (default by device name: H100 SXM 3350, H200 4800 GB/s). The L2 cache is
flushed before every timed call, by zeroing a 256 MB buffer (``--flush write``, the usual way, as Triton's
``do_bench`` does) or by reading one (``--flush read``). A write flush leaves the L2 full of dirty lines that the
timed kernel's reads evict, and so write back; in a decode step the kernels before attention read weights and
leave clean lines. ``call_us`` pays that write-back whole; in ``dev_us`` the flushes-alone graph, whose flushes
write back each other's lines, cancels most of it (what remains is the cost of mixing it with the kernel's
reads). Only torch and triton are needed (no hydra / wandb).
"""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch

PEAK_GBPS = (("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100", 2039.0))


def default_peak_gbps(device_name: str) -> float | None:
    """Peak HBM bandwidth in GB/s for known devices, else None."""
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return gbps
    return None


def binary_tree_mask(n: int, device) -> torch.Tensor:
    """Ancestor-and-self mask ``[n, n]`` of a complete binary tree (parent of i is (i-1)//2)."""
    mask = torch.zeros(n, n, dtype=torch.bool)  # [n, n]
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = (j - 1) // 2 if j > 0 else -1
    return mask.to(device)


def make_case(B, Hq, Hkv, N, P, D, dtype, device, seed=0):
    """Random q ``[B, Hq, N, D]`` and a KV cache k, v ``[B, Hkv, P + N, D]``."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, N, D, device=device, dtype=dtype, generator=g)  # [B, Hq, N, D]
    k = torch.randn(B, Hkv, P + N, D, device=device, dtype=dtype, generator=g)  # [B, Hkv, L, D]
    v = torch.randn(B, Hkv, P + N, D, device=device, dtype=dtype, generator=g)  # [B, Hkv, L, D]
    return q, k, v


FLUSH_BYTES = 256 * 2**20  # several times the L2 of any current GPU (H100/H200: 50 MB)
FLUSH_MODES = ("write", "read")


def make_flush(device, mode: str = "write"):
    """``flush()``: evict the L2 cache by streaming :data:`FLUSH_BYTES` through it. ``write`` zeroes a buffer (the
    common way; it leaves the L2 full of dirty lines, whose write-back the next kernel may pay for); ``read``
    reduces one, leaving clean lines, as a decode step's weight reads leave it before attention runs."""
    if mode not in FLUSH_MODES:
        raise ValueError(f"flush mode {mode!r}: choose one of {FLUSH_MODES}")
    buf = torch.zeros(FLUSH_BYTES // 4, dtype=torch.int32, device=device)  # [FLUSH_BYTES / 4]
    if mode == "write":
        return buf.zero_
    total = torch.zeros((), dtype=torch.int32, device=device)
    return lambda: torch.amax(buf, dim=0, out=total)


def time_us(fn, device, warmup: int, reps: int, flush=None) -> float:
    """Median time of ``fn()`` in microseconds (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            if flush is not None:
                flush()  # evict K/V from L2
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def device_time_us(fn, device, reps: int, flush=None, calls: int = 10) -> float | None:
    """Median device time of ``fn()``'s kernels, without the launch of the graph that holds them.

    ``calls`` calls (each after an L2 flush) are captured in one CUDA graph; the graph's replay time less that
    of a graph holding the flushes alone, divided by ``calls``. None where the call cannot be captured (it
    syncs with the host, or allocates in a way capture refuses).
    """
    def sequence(with_fn: bool):
        for _ in range(calls):
            if flush is not None:
                flush()  # evict K/V from L2
            if with_fn:
                fn()

    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            fn()
            fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graphs = [torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()]
        for graph, with_fn in zip(graphs, (True, False)):
            with torch.cuda.graph(graph):
                sequence(with_fn)
    except Exception:  # noqa: BLE001 - a method that cannot be captured has no device time here
        torch.cuda.synchronize(device)
        return None
    both, flushes = (time_us(g.replay, device, 3, reps, None) for g in graphs)
    return max(both - flushes, 0.0) / calls


def host_time_us(fn, device, reps: int) -> float:
    """Median wall time of the Python call ``fn()`` itself, the device queue idle before each call."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def build_methods(q, k, v, P, mask, scale, flex: bool, flex_compile: bool):
    """Name -> zero-argument callable for every method (setup outside the timed region)."""
    from specdec_kernels import TreeAttentionPlan, tree_attention

    B, Hq, N, D = q.shape
    G = Hq // k.shape[1]
    plan = TreeAttentionPlan(P, mask, reuse_output=True)  # as the verifier's: one per step, shared by the layers
    fused = TreeAttentionPlan(P, mask, config={"merge": "fused"}, reuse_output=True)  # split-K merged in one kernel
    methods = {"triton": lambda: plan(q, k, v, scale), "triton_fused": lambda: fused(q, k, v, scale),
               "triton_1x": lambda: tree_attention(q, k, v, P, mask, scale)}
    ke, ve = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)  # [B, Hq, L, D]
    allowed = torch.cat([torch.ones(N, P, dtype=torch.bool, device=q.device), mask], 1)  # [N, L]
    add_mask = torch.zeros(1, 1, N, P + N, dtype=q.dtype, device=q.device)  # [1, 1, N, L]
    add_mask.masked_fill_(~allowed, float("-inf"))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    methods["sdpa"] = lambda: sdpa(q, ke, ve, attn_mask=add_mask, scale=scale)
    if flex and q.device.type == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        def mask_mod(b, h, q_idx, kv_idx):
            j = (kv_idx - P).clamp(0, N - 1)
            return (kv_idx < P) | ((kv_idx < P + N) & mask[q_idx, j])

        block_mask = create_block_mask(mask_mod, None, None, N, P + N, device=q.device)
        methods["flex"] = lambda: flex_attention(q, k, v, block_mask=block_mask, scale=scale,
                                                 enable_gqa=G > 1)
        if flex_compile:
            compiled = torch.compile(flex_attention, dynamic=False)
            methods["flex_c"] = lambda: compiled(q, k, v, block_mask=block_mask, scale=scale,
                                                 enable_gqa=G > 1)
    return methods


def run_case(B, Hq, Hkv, N, P, D, dtype, device, args, flush):
    """Time every method on one shape; return one result row per method."""
    q, k, v = make_case(B, Hq, Hkv, N, P, D, dtype, device)
    mask = binary_tree_mask(N, device)
    scale = 1.0 / math.sqrt(D)
    nbytes = q.element_size() * (2 * k.numel() + 2 * q.numel())  # K + V read, Q read + O written
    methods = build_methods(q, k, v, P, mask, scale, not args.no_flex, not args.no_flex_compile)
    ref = methods["triton"]().float().clone()  # [B, Hq, N, D]; the plan rewrites its output every call
    rows = []
    for name, fn in methods.items():
        row = dict(method=name, dtype=str(dtype).replace("torch.", ""), B=B, Hq=Hq, Hkv=Hkv,
                   N=N, prefix=P, D=D, bytes=nbytes)
        try:
            err = (fn().float() - ref).abs().max().item()
            t = time_us(fn, device, args.warmup, args.reps, flush)
            row.update(time_us=t, max_abs_diff_vs_triton=err, call_us=t)
            if device.type == "cuda":
                row.update(dev_us=device_time_us(fn, device, args.reps, flush), host_us=host_time_us(fn, device, args.reps))
                t = row["dev_us"] or t  # bandwidth from the device time where the call could be captured
                row["time_us"] = t
            row["gbps"] = nbytes / (t * 1e-6) / 1e9
        except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
            row.update(time_us=None, error=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
        rows.append(row)
    return rows


def add_ratios(rows, peak):
    """Fill ``peak_frac`` and ``t_over_t_n1`` (time relative to N=1 of the same setting)."""
    key = lambda r: (r["method"], r["dtype"], r["Hkv"], r["prefix"], r["D"])  # noqa: E731
    t1 = {key(r): r["time_us"] for r in rows if r["N"] == 1 and r.get("time_us")}
    for r in rows:
        t = r.get("time_us")
        r["peak_frac"] = r["gbps"] / peak if t and peak else None
        r["t_over_t_n1"] = t / t1[key(r)] if t and key(r) in t1 else None


def print_table(rows, methods):
    """One line per shape, device time (us) / fraction of peak bandwidth / T(N)/T(1) per method; then the
    whole call's time and its host part (GPU only)."""
    def fmt(x, spec):
        return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))
    head = f"{'dtype':>8} {'Hkv':>4} {'N':>3} {'prefix':>6} |"
    head += "".join(f" {m + ' us':>10} {'bw%':>5} {'xN1':>5} |" for m in methods)
    print(head)
    print("-" * len(head))
    by_shape = {}
    for r in rows:
        by_shape.setdefault((r["dtype"], r["Hkv"], r["N"], r["prefix"]), {})[r["method"]] = r
    for (dt, hkv, n, p), per in by_shape.items():
        line = f"{dt:>8} {hkv:>4} {n:>3} {p:>6} |"
        for m in methods:
            r = per.get(m, {})
            frac = r.get("peak_frac")
            line += (f" {fmt(r.get('time_us'), '10.1f')} {fmt(frac and 100 * frac, '5.1f')}"
                     f" {fmt(r.get('t_over_t_n1'), '5.2f')} |")
        print(line)
    if any(r.get("host_us") is not None for r in rows):
        print("\nwhole eager call (us) / its host-side part (us), per method:")
        head = f"{'dtype':>8} {'Hkv':>4} {'N':>3} {'prefix':>6} |" + "".join(f" {m:>19} |" for m in methods)
        print(head)
        for (dt, hkv, n, p), per in by_shape.items():
            line = f"{dt:>8} {hkv:>4} {n:>3} {p:>6} |"
            for m in methods:
                r = per.get(m, {})
                line += f" {fmt(r.get('call_us'), '9.1f')} {fmt(r.get('host_us'), '9.1f')} |"
            print(line)
    for r in rows:
        if r.get("error"):
            print(f"  {r['method']} N={r['N']} prefix={r['prefix']} Hkv={r['Hkv']}: {r['error']}")
        elif r.get("max_abs_diff_vs_triton", 0.0) > 2e-2:
            print(f"  warning: {r['method']} differs from triton by {r['max_abs_diff_vs_triton']:.3g}"
                  f" (N={r['N']} prefix={r['prefix']} Hkv={r['Hkv']} {r['dtype']})")


def parse_args(argv=None):
    from experiments.cli import ArgumentParser, int_at_least, output_file  # imports neither torch nor hydra

    p = ArgumentParser(prog="python -m specdec_kernels.bench", description=__doc__.splitlines()[0])
    p.add_argument("--ns", type=int_at_least(1), nargs="+", default=[1, 8, 16, 64], help="tree sizes N")
    p.add_argument("--prefixes", type=int_at_least(1), nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--hkv", type=int_at_least(1), nargs="+", default=[32, 8], help="KV heads (Hq = 32)")
    p.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=("float16", "bfloat16", "float32"))
    p.add_argument("--hq", type=int_at_least(1), default=32)
    p.add_argument("--head-dim", type=int_at_least(1), default=128)
    p.add_argument("--batch", type=int_at_least(1), default=1)
    p.add_argument("--warmup", type=int_at_least(0), default=10)
    p.add_argument("--reps", type=int_at_least(1), default=50)
    p.add_argument("--peak-gbps", type=float, default=None,
                   help="peak memory bandwidth; default by device name (H100 3350, H200 4800)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--no-flex-compile", action="store_true", help="skip compiled FlexAttention")
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between calls")
    p.add_argument("--flush", choices=FLUSH_MODES, default="write",
                   help="how L2 is flushed: zero a buffer (dirty lines, the usual way) or read one (clean lines)")
    p.add_argument("--json", type=output_file, default=None, help="write the results here")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="without CUDA: run two fixed tiny fp32 cases on the CPU under TRITON_INTERPRET=1 (the "
                        "shape and dtype flags apply on a GPU)")
    return p.parse_args(argv)


def _write_json(path, meta, rows, quiet: bool = False):
    with open(path, "w") as f:
        json.dump({**meta, "results": rows}, f, indent=2)
    if not quiet:
        print(f"wrote {path}")


def main(argv=None) -> int:
    """The bench's command line. Failures follow :func:`experiments.cli.guard`: what the input caused (a flag, a
    size that runs the GPU out of memory) is one ``error:`` line with exit status 2, a bug a traceback and 1."""
    from experiments.cli import guard  # imports neither torch nor hydra

    return guard()(_main)(argv)


def _main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        if not args.interpret_smoke:
            print("error: no CUDA device here: the bench times the kernel on a GPU; --interpret-smoke checks the "
                  "script on the CPU under the Triton interpreter", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") != "1":  # must be set before triton's first import
            cmd = [sys.executable, "-m", "specdec_kernels.bench", *(sys.argv[1:] if argv is None else argv)]
            return subprocess.call(cmd, env={**os.environ, "TRITON_INTERPRET": "1"})
        import triton

        device = torch.device("cpu")
        args.no_flex, args.warmup, args.reps = True, 1, 2
        rows = run_case(1, 4, 2, 1, 40, 64, torch.float32, device, args, None)
        rows += run_case(1, 4, 2, 4, 300, 64, torch.float32, device, args, None)  # 2 splits: merged either way
        add_ratios(rows, None)
        print("interpreter smoke test (CPU timings are meaningless):")
        print_table(rows, ["triton", "triton_fused", "sdpa"])
        meta = dict(device="cpu (TRITON_INTERPRET=1)", peak_gbps=None,
                    torch=torch.__version__, triton=triton.__version__)
        if args.json:
            _write_json(args.json, meta, rows)
        bad = [r for r in rows if r.get("error") or r["max_abs_diff_vs_triton"] > 1e-4]
        return 1 if bad else 0

    import triton

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    peak = args.peak_gbps or default_peak_gbps(name)
    if peak is None:
        print(f"unknown peak bandwidth for {name!r}; pass --peak-gbps to get bw%")
    if not args.no_flex_compile:
        for attr in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                     "accumulated_recompile_limit"):
            if hasattr(torch._dynamo.config, attr):  # one compile per shape; avoid eager fallback
                setattr(torch._dynamo.config, attr, 4096)
    flush = None if args.no_flush else make_flush(device, args.flush)
    meta = dict(device=name, peak_gbps=peak, torch=torch.__version__, triton=triton.__version__, args=vars(args))
    rows = []
    for dt in args.dtypes:
        for hkv in args.hkv:
            for p in args.prefixes:
                for n in args.ns:
                    rows += run_case(args.batch, args.hq, hkv, n, p, args.head_dim,
                                     getattr(torch, dt), device, args, flush)
                    add_ratios(rows, peak)
                    if args.json:  # after every shape: a run cut short keeps what it measured
                        _write_json(args.json, {**meta, "complete": False}, rows, quiet=True)
                    print(f"  done {dt} Hkv={hkv} prefix={p} N={n}", flush=True)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    print(f"\n{name}, peak {peak} GB/s, B={args.batch} Hq={args.hq} D={args.head_dim}; "
          f"median of {args.reps}, L2 {'not flushed' if args.no_flush else f'flushed ({args.flush})'}")
    print_table(rows, methods)
    if args.json:
        _write_json(args.json, {**meta, "complete": True}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
