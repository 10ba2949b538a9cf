"""Captured and compiled fixed-shape steps kept for later batches, and the CUDA-graph capture itself.

A step captured in a CUDA graph (``compile="graph"``) or compiled by ``torch.compile``
(``compile="inductor"``) reads and writes fixed buffers. :func:`step_for` keeps such steps on their
decoder (the last :data:`KEPT_STEPS`, per batch size and capacity bucket) and refills a kept step's
buffers in place for a later batch, so it is captured or compiled once, not once per call.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from verifier.fused_projections import has_fused_projections

if TYPE_CHECKING:
    from specdec.static_step import StaticStep

KEPT_STEPS = 4  # steps a decoder keeps for reuse (batch size, capacity bucket, ...)


def capture_graph(fn, device: torch.device, reset=None):
    """``fn`` captured in a CUDA graph, returned as the graph's replay: one warm-up call on a side stream
    (kernels pick their algorithms, lazy buffers are allocated), ``reset()`` if given, then the capture.
    Raises what the capture raises (a call that syncs with the host or copies from it cannot be captured)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def step_for(decoder, rows: list[list[int]], limits: list[int], seeds: list[int], compile: str) -> StaticStep:
    """The step for these rows. ``static``: a new one. ``graph`` / ``inductor``: the decoder's kept step of the
    same batch size and capacity bucket, built for the decoder's current drafter, draft model, rule and sampling
    (the same objects), its buffers refilled in place (captured or compiled once, replayed for every later
    batch), or a new one that is kept (the last :data:`KEPT_STEPS`). A drafter or rule changed in place after a
    step was kept is not noticed: set a new one instead."""
    from specdec.static_shape import static_drafter
    from specdec.static_step import StaticStep, capacity_for

    if compile not in ("graph", "inductor"):
        return StaticStep.for_decoder(decoder, rows, limits, seeds, compile)
    _, compiled, _ = static_drafter(decoder.drafter, decoder.sampling)
    capacity = capacity_for(rows, limits, compiled.num_nodes if compiled is not None else 0, compile)
    # the step chose SDPA or the tree kernel when it was built, and captured the weights it found: projections
    # fused in place afterwards would leave a kept graph reading the unfused ones' freed memory
    key = (compile, len(rows), capacity, repr(decoder.sampling), tuple(sorted(decoder.eos)),
           decoder.verifier.attn_backend, has_fused_projections(decoder.target))

    def built_for() -> tuple:  # the objects a step serves (held by the entry, so they stay themselves)
        return decoder.target, decoder.drafter, getattr(decoder.drafter, "model", None), decoder.rule

    kept = decoder.static_steps
    entry = kept.pop(key, None)  # (built_for(), step)
    if entry is not None and all(a is b for a, b in zip(entry[0], built_for())):
        step = entry[1]
        step.write_rows(rows, limits, seeds)
    else:
        step = StaticStep.for_decoder(decoder, rows, limits, seeds, compile)  # binds the drafter's model
    kept[key] = (built_for(), step)  # the most recently used last
    while len(kept) > KEPT_STEPS:
        kept.pop(next(iter(kept)))
    return step
