"""A lean inference forward for small Llama-family draft models (EAGLE heads, draft models).

Draft models here are small: an EAGLE head is one decoder layer, the embedded draft model too. At
batch 1 their forward of one token is mostly overhead on a CPU (or a GPU without graphs):
transformers' forward builds masks, calls a rotary module, goes through the attention interface and
output records around a handful of small matmuls. Measured on the 2-core CPU of BENCHMARKS.md (a
bf16 EAGLE head of the embedded pair, one token after 200 slots): 3.2 ms through the model against
2.0 ms here; inside a decode, where the target's forwards evict the draft from the caches, drafting
time per step falls by about a quarter. :class:`FastDecoder` does the same arithmetic directly:

- per layer, q, k and v in one matmul and gate and up in one (fused copies of the layer's weights,
  rebuilt when the weights change: a new dtype or device, or training in place);
- rotary cosines and sines looked up in a table built once per cache capacity by the model's own
  rotary module (so every position-only rope type is covered);
- attention as two float32 matmuls over the cache layer's keys and values (grouped-query heads by
  view), with the caller's key mask or a causal one: on this CPU a bf16 matmul or SDPA over a draft's
  cache costs 2-4x its float32 form (in a decode 0.69 ms against 0.19 ms per head forward);
- the KV written through each cache layer's own ``update``, so any cache of this package works
  (:class:`specdec.cache.SpecDecCache` appends, :class:`specdec.batch_cache.BatchCache` writes each
  row's block at its length).

Only layers whose arithmetic is known exactly are taken (:data:`SUPPORTED`: Llama and Qwen2 layers,
full attention, position-only rope, SiLU); :func:`unsupported` says why another model is not, and
:func:`forward_lm` then runs the model as usual. Inference only (no autograd). The output equals the
model's up to floating-point rounding; a draft's rounding never changes what is emitted (the target
verifies every token). Targets always run through transformers.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from specdec.cache import SpecDecCache
from verifier.fused_projections import FusedPart, joined
from verifier.verifier import attention_inputs, model_forward

PROBE_CONTEXT = 128  # cache slots before the token a cost probe feeds

SUPPORTED = ("LlamaDecoderLayer", "Qwen2DecoderLayer")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only


def unsupported(model) -> str | None:
    """None if :class:`FastDecoder` can run the causal LM ``model``; else the reason it cannot."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return "no model.layers"
    names = {type(layer).__name__ for layer in layers}
    if not names <= set(SUPPORTED):
        return f"{min(names - set(SUPPORTED))} is not one of {list(SUPPORTED)}"
    if any(getattr(layer.self_attn, "sliding_window", None) for layer in layers):
        return "sliding-window attention"
    rope = getattr(getattr(model.model, "rotary_emb", None), "rope_type", None)
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} is not one of {list(STATIC_ROPE)}"
    if getattr(model.config, "hidden_act", "silu") != "silu":
        return f"hidden_act={model.config.hidden_act!r} (only silu)"
    return None


def fast_decoder(model) -> FastDecoder | None:
    """``model``'s :class:`FastDecoder` (built once, kept on the model), or None where it does not apply."""
    known = model.__dict__.get("_specdec_fast")
    if known is None or known[0] is not model:  # a shallow copy of a model (a view) gets its own
        known = (model, FastDecoder(model) if unsupported(model) is None else None)
        model.__dict__["_specdec_fast"] = known
    return known[1]


def forward_lm(model, input_ids: torch.Tensor, cache, position_ids: torch.Tensor, key_mask: torch.Tensor | None = None,
               logits_to_keep: int = 0, fast: bool = True, backend: str = "sdpa",
               output_hidden: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One forward of the causal LM ``model`` on ``input_ids [B, n]`` written to ``cache`` (any of this package's
    caches) at ``position_ids [B, n]``, seeing ``key_mask [B, 1, n, S]`` (None: causal). Returns ``(logits
    [B, n', V] float32, final hidden states [B, n, H])``, ``n'`` per ``logits_to_keep`` (the model's own forward
    returns no hidden states unless ``output_hidden``; the lean one always does, at no cost).

    ``fast``: through :class:`FastDecoder` where ``model`` allows it; otherwise, or with ``fast=False``, the
    model's own forward with attention ``backend``.
    """
    decoder = fast_decoder(model) if fast else None
    if decoder is None:
        return model_forward(model, cache, input_ids, position_ids, attention_inputs(backend, 0, None, key_mask),
                             backend, logits_to_keep, output_hidden)
    with torch.no_grad():
        hidden = decoder(model.get_input_embeddings()(input_ids), cache, position_ids, key_mask)  # [B, n, H]
        kept = _dense(hidden[:, -logits_to_keep:]) if 0 < logits_to_keep < hidden.shape[1] else hidden  # [B, n', H]
        return model.get_output_embeddings()(kept).float(), hidden


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` copied to standard strides. On the CPU a bf16 matmul whose input is a slice leaves oneDNN's fast path,
    even a slice torch calls contiguous (``[1, 1, H]`` of a ``[1, n, H]``: only its size-1 dim is strided): measured
    on the 2-core CPU of BENCHMARKS.md, a 512 -> 4096 LM head on ``hidden[:, -1:]`` of two tokens took 2.4 ms
    against 0.12 ms on the copy, 10 ms against 0.2 ms for four rows. The copy is ``B n' H`` values."""
    return x.clone(memory_format=torch.contiguous_format)


def lean_probe(model, fast: bool = True, context: int = PROBE_CONTEXT):
    """The probe of a draft model run through the lean forward (:func:`forward_probe`), or None where it takes
    transformers' forward (``fast`` false, or a model :class:`FastDecoder` does not support): then its cost is a
    model's forward, timed as such. What the draft-model drafters and the bench time their drafts by."""
    return forward_probe(model, True, context) if fast and fast_decoder(model) is not None else None


def forward_probe(model, fast: bool, context: int = PROBE_CONTEXT, enter=None):
    """A zero-argument callable timing what a draft forward costs: one token after ``context`` cached slots
    through :func:`forward_lm` (``fast``), as drafting runs it. ``enter(n)``: a context manager around each
    forward of ``n`` tokens that yields the model to run (an EAGLE head sets its features there)."""
    enter = enter or (lambda n: contextlib.nullcontext(model))
    device = next(model.parameters()).device
    cache = SpecDecCache.for_model(model, context + 1)
    ids = torch.zeros(1, context + 1, dtype=torch.long, device=device)  # [1, C + 1]
    positions = torch.arange(context + 1, device=device)[None]  # [1, C + 1]
    with enter(context) as m:
        forward_lm(m, ids[:, :context], cache, positions[:, :context], None, 1, fast)

    def probe() -> torch.Tensor:
        cache.truncate(context)
        with enter(1) as m:
            return forward_lm(m, ids[:, :1], cache, positions[:, context:], None, 1, fast)[0]
    return probe


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class _Layer:
    """One decoder layer's fused weights, rebuilt when a source weight was replaced or changed."""

    def __init__(self, layer):
        self.layer = layer
        self._key = None

    def weights(self) -> tuple:
        """``(w_qkv, b_qkv, w_gate_up, b_gate_up)``."""
        attn, mlp = self.layer.self_attn, self.layer.mlp
        groups = ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj))
        key = tuple((lin.weight.data_ptr(), lin.weight._version, lin.weight.dtype) for lin in _holders(groups))
        if key != self._key:
            with torch.no_grad():
                self._w = (*joined(groups[0]), *joined(groups[1]))  # [(Hq + 2 Hkv) D, H], .., [2 I, H], ..
            self._key = key
        return self._w


def _holders(groups) -> list:
    """The modules holding the groups' weights: each linear, or a fused group's first part only."""
    return [lin for g in groups for lin in (g[:1] if isinstance(g[0], FusedPart) else g)]


class FastDecoder:
    """The decoder layers and final norm of a causal LM ``model``, run directly (see the module).

    Call it with the first layer's input ``x [B, n, H]`` (the embedded tokens; an EAGLE head's fused
    pairs), the cache holding the layers' keys and values, ``position_ids [B, n]`` and a bool ``key_mask
    [B, 1, n, S]`` (None: causal, the block's token i sees every earlier slot and the block's tokens up
    to i); it returns the final-normed hidden states ``[B, n, H]``.
    """

    def __init__(self, model):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"FastDecoder cannot run this model: {reason}")
        self.model = model
        self.layers = [_Layer(layer) for layer in model.model.layers]
        attn = model.model.layers[0].self_attn
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self._table_key = None

    def _rope(self, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[size, D]``: the model's rotary module at positions ``0 .. size - 1``."""
        key = (size, dtype, device)
        if key != self._table_key:
            positions = torch.arange(size, device=device)[None]  # [1, size]
            with torch.no_grad():
                cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=dtype, device=device), positions)
            self._table, self._table_key = (cos[0], sin[0]), key  # [size, D] each
        return self._table

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cache, position_ids: torch.Tensor,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        cos, sin = self._rope(cache.layers[0].get_max_cache_shape(), x.dtype, x.device)
        rope = (cos[position_ids][:, None], sin[position_ids][:, None])  # [B, 1, n, D] each
        for layer, cache_layer in zip(self.layers, cache.layers):
            x = self._layer(layer, x, cache_layer, rope, key_mask)
        return _rms(x, self.model.model.norm)  # [B, n, H]

    def _layer(self, fused: _Layer, x: torch.Tensor, cache_layer, rope, key_mask) -> torch.Tensor:
        """One decoder layer on ``x [B, n, H]``; writes the block's keys and values to ``cache_layer``."""
        layer = fused.layer
        b, n, _ = x.shape
        w_qkv, b_qkv, w_gu, b_gu = fused.weights()
        qkv = F.linear(_rms(x, layer.input_layernorm), w_qkv, b_qkv)  # [B, n, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, Hq, n, D]
        k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, n, D]
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, n, D]
        cos, sin = rope
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache_layer.update(k, v)  # [B, Hkv, S, D] each, this block included
        out = self._attend(q, keys, values, key_mask)  # [B, n, Hq D]
        o_proj = layer.self_attn.o_proj
        x = x + F.linear(out, o_proj.weight, o_proj.bias)  # [B, n, H]
        gate, up = F.linear(_rms(x, layer.post_attention_layernorm), w_gu, b_gu).chunk(2, dim=-1)  # [B, n, I] each
        down = layer.mlp.down_proj
        return x + F.linear(F.silu(gate) * up, down.weight, down.bias)  # [B, n, H]

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                key_mask: torch.Tensor | None) -> torch.Tensor:
        """Attention of ``q [B, Hq, n, D]`` over ``keys/values [B, Hkv, S, D]``; ``[B, n, Hq D]``."""
        b, _, n, d = q.shape
        s, group = keys.shape[2], self.heads // self.kv_heads
        grouped = q.reshape(b, self.kv_heads, group * n, d).float()  # [B, Hkv, g n, D]: head h reads kv head h // g
        scores = torch.matmul(grouped, keys.float().transpose(-1, -2)) * self.scaling  # [B, Hkv, g n, S]
        if key_mask is None and n > 1:  # causal: token i sees slots up to s - n + i
            key_mask = (torch.arange(s, device=q.device)[None] <=
                        torch.arange(s - n, s, device=q.device)[:, None])[None, None]  # [1, 1, n, S]
        if key_mask is not None:
            mask = key_mask[:, :, None].expand(-1, -1, group, -1, -1).reshape(key_mask.shape[0], 1, group * n, s)
            scores = scores.masked_fill(~mask, float("-inf"))  # [B, Hkv, g n, S]
        probs = scores.softmax(dim=-1)  # [B, Hkv, g n, S]
        out = torch.matmul(probs, values.float()).to(q.dtype)  # [B, Hkv, g n, D]
        return out.view(b, self.heads, n, d).transpose(1, 2).reshape(b, n, self.heads * d)  # [B, n, Hq D]


def _rms(x: torch.Tensor, norm) -> torch.Tensor:
    """A Llama-family RMSNorm module's arithmetic (``weight * x / rms(x)``) through ``F.rms_norm``."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
