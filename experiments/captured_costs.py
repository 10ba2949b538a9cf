"""Forward costs of the fixed-shape step and the read floor they are measured against.

The captured step (``compile=graph``) runs each forward as one CUDA-graph replay, so its cost is no
longer the launch-bound eager cost :mod:`experiments.cost_measure` times. Here:

- :func:`static_curve`: the target's (or draft's) static block forward of ``w`` tokens after ``context``
  cached tokens, exactly as :class:`specdec.static_step.StaticStep` runs it (preallocated
  :class:`specdec.batch_cache.BatchCache`, device-side lengths), captured in a CUDA graph and replayed on
  a GPU; eager elsewhere (then it is the static step's eager cost).
- :func:`copy_bandwidth`: the device's measured copy bandwidth (a large device-to-device copy).
- :func:`read_floor_s`: the least time one forward can take: its weights plus its KV cache at
  ``context`` read once at that bandwidth.

``python -m experiments.bench --compile graph`` prints them as a table and judges the captured rows
against them (efficiency over the captured AR loop, predicted from these costs). Importable without
hydra or wandb.
"""
from __future__ import annotations

import statistics
import time

import torch

from specdec.models import synchronize, text_config


def _median_s(fn, device: torch.device, reps: int) -> float:
    """Median seconds of ``fn()`` with the device synchronised around each call."""
    times = []
    for _ in range(reps):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def replayable(fn, device: torch.device) -> tuple:
    """``(replay, True)``: ``fn`` captured in a CUDA graph (after a warm-up on a side stream); ``(fn, False)``
    on a CPU or where capture fails (the cost is then the eager one)."""
    from specdec.static_kept import capture_graph

    if device.type != "cuda":
        return fn, False
    try:
        return capture_graph(fn, device), True
    except Exception:  # noqa: BLE001 - a forward that cannot be captured is timed eagerly
        torch.cuda.synchronize(device)
        return fn, False


def static_forwards(model, context: int, widths: tuple[int, ...], compile: str = "graph", backend: str = "sdpa",
                    capture: bool = True):
    """Yield ``(w, run, replayed)`` per width: ``run()`` is ``model``'s static block forward of ``w`` causal tokens
    after ``context`` cached tokens (batch 1) over a cache of the captured step's capacity bucket, exactly as
    :class:`specdec.static_step.StaticStep` runs it, captured in a CUDA graph on a GPU (``replayed``; else eager).
    The block is written at the same slots every call (lengths never advance), so calls are alike.
    ``compile="none"``: eager, never captured; ``compile="inductor"``: each width's forward is compiled by
    ``torch.compile`` first (then captured, as the step is); ``backend="triton"``: attention runs the tree
    kernel on the device-side lengths (:mod:`specdec_kernels.rows`), as the step's verify forward does with
    ``attn_backend=triton``. ``capture=False``: never captured (to profile the kernels one by one)."""
    from specdec.batch_cache import BatchCache
    from specdec.static_step import CAPACITY_BUCKET, _forward
    from specdec_kernels import pack_tree_mask
    from verifier.batch import prefill_rows

    device = next(model.parameters()).device
    capacity = -(-(context + max(widths) + 2) // CAPACITY_BUCKET) * CAPACITY_BUCKET  # attention spans all of it
    cache = BatchCache.for_model(model, capacity, 1)
    gen = torch.Generator().manual_seed(0)
    vocab = text_config(model).vocab_size
    with torch.inference_mode(False), torch.no_grad():
        prefill_rows(model, cache, [torch.randint(1, vocab, (context,), generator=gen).tolist()], output_hidden=False)
        for w in widths:
            ids = torch.randint(1, vocab, (1, w), generator=gen).to(device)  # [1, w]
            offsets = torch.arange(w, device=device)[None]  # [1, w]
            causal = torch.ones(w, w, dtype=torch.bool, device=device).tril()[None]  # [1, w, w]
            bits = pack_tree_mask(causal[0]) if backend == "triton" else None  # [w]

            def forward(ids=ids, offsets=offsets, causal=causal, bits=bits):
                return _forward(model, cache, ids, offsets, causal, bits=bits)[0]  # [1, w, V]

            if compile == "inductor":  # one compiled graph per width and variant: past dynamo's limit it would run
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # eagerly
                forward = torch.compile(forward, dynamic=False)
                forward()  # compiles: not timed
            run, replayed = replayable(forward, device) if capture and compile != "none" else (forward, False)
            run()
            yield w, run, replayed


def static_curve(model, context: int, widths: tuple[int, ...], reps: int = 10, compile: str = "graph",
                 backend: str = "sdpa") -> tuple[dict[int, float], bool]:
    """Per width ``w``, the median seconds of :func:`static_forwards`' forward, and whether every width was
    captured (on a GPU; else eager)."""
    device = next(model.parameters()).device
    curve, captured = {}, True
    for w, run, replayed in static_forwards(model, context, widths, compile, backend):
        curve[w], captured = _median_s(run, device, reps), captured and replayed
    return curve, captured


def copy_bandwidth(device: torch.device, nbytes: int | None = None, reps: int = 10) -> float:
    """Bytes per second of a device-to-device copy (bytes read plus bytes written over the median time);
    1 GiB on a GPU, 256 MiB elsewhere."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 2**28)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * nbytes / _median_s(lambda: dst.copy_(src), device, reps)


def kv_bytes_per_token(model) -> int:
    """Bytes of keys and values one cached token holds across ``model``'s layers."""
    cfg = text_config(model)
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * heads * head_dim * next(model.parameters()).element_size()


def weight_bytes_read(model) -> int:
    """Bytes of ``model``'s weights one forward reads: every parameter but the input embedding table, of which
    a forward reads one row per token (unless the output head shares it: the head reads it whole)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    table = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() == table.data_ptr():
        return total  # tied: counted once, read whole by the head
    return total - table.numel() * table.element_size()


def read_floor_s(model, context: int, bandwidth: float) -> float:
    """Seconds to read the weights a forward of ``model`` reads (:func:`weight_bytes_read`) and its KV cache at
    ``context`` tokens once at ``bandwidth``."""
    return (weight_bytes_read(model) + context * kv_bytes_per_token(model)) / bandwidth


def static_costs(target, draft, context: int, ks: list[int], reps: int = 10, compile: str = "graph",
                 backend: str = "sdpa") -> dict:
    """The static step's forward costs in :mod:`experiments.cost_measure`'s layout (``target``: width ->
    seconds for widths 1 .. max k + 1; ``draft``: one token, or None) plus ``floor_s`` (the target's read
    floor at ``context``), ``bandwidth`` (bytes/s) and ``captured`` (every forward replayed from a CUDA graph).
    ``compile``/``backend``: as the step runs them (:func:`static_curve`; the draft's forwards use SDPA there).
    Compiled (``inductor``), only the widths 1 and max k + 1 are timed, each compile costing tens of seconds on
    a large model; the costs between are interpolated (:func:`experiments.costs.cost_at`)."""
    device = next(target.parameters()).device
    widest = max(ks, default=1) + 1
    widths = tuple(sorted({1, widest})) if compile == "inductor" else tuple(range(1, widest + 1))
    bandwidth = copy_bandwidth(device)
    curve, captured = static_curve(target, context, widths, reps, compile, backend)
    draft_curve, draft_captured = (static_curve(draft, context, (1,), reps, compile) if draft is not None
                                   else ({1: None}, True))
    return {"target": curve, "draft": draft_curve[1], "floor_s": read_floor_s(target, context, bandwidth),
            "bandwidth": bandwidth, "captured": captured and draft_captured}


def floor_line(costs: dict, context: int) -> str:
    """One sentence: the fixed-shape step's forwards (captured or eager) against the target's read floor."""
    t = costs["target"]
    widest = max(t)
    draft = f"; draft w1 {costs['draft'] * 1e3:.2f} ms" if costs["draft"] is not None else ""
    how = "captured in CUDA graphs" if costs["captured"] else "eager: not captured"
    return (f"Fixed-shape step's forward costs ({how}) at context {context}: target w1 {t[1] * 1e3:.2f} ms = "
            f"{t[1] / costs['floor_s']:.2f}x its read floor of {costs['floor_s'] * 1e3:.2f} ms (weights + KV at "
            f"{costs['bandwidth'] / 1e9:.0f} GB/s measured copy bandwidth), w{widest} {t[widest] * 1e3:.2f} ms "
            f"(T(w{widest})/T(1) {t[widest] / t[1]:.2f}){draft}.")
