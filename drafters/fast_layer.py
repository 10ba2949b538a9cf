"""A lean inference forward of a one-layer draft model's decoder layer (EAGLE heads).

An EAGLE head is one decoder layer, and at batch 1 its forward of one token is almost all overhead
on a CPU or a GPU without graphs: transformers' forward builds masks, calls a rotary module, goes
through the attention interface and output records for a handful of small matmuls. Measured on the
2-core CPU of BENCHMARKS.md (a bf16 head of the embedded pair, one token after 200 slots): 3.2 ms
through the model against 2.0 ms here; inside a decode, where the target's forwards evict the head
from the caches, the head's draft time per step falls by about a quarter. :class:`FastLayer` does the
same arithmetic directly:

- q, k and v in one matmul, gate and up in one (fused copies of the layer's weights, rebuilt when the
  weights change: a new dtype or device, or training in place);
- rotary cosines and sines looked up in a table built once per cache capacity by the model's own
  rotary module (so every position-only rope type is covered);
- attention as two float32 matmuls over the cache layer's keys and values (grouped-query heads by
  view), with the caller's key mask or a causal one: on this CPU a bf16 matmul or SDPA over a head's
  cache costs 2-4x its float32 form (in a decode 0.69 ms against 0.19 ms per head forward);
- the KV written through the cache layer's own ``update``, so any cache of this package works
  (:class:`specdec.cache.SpecDecCache` appends, :class:`specdec.batch_cache.BatchCache` writes each
  row's block at its length).

Only layers whose arithmetic is known exactly are taken (:data:`SUPPORTED`: Llama and Qwen2 layers,
full attention, position-only rope); :func:`unsupported` says why another is not, and the caller then
runs the model as usual. Inference only (no autograd). The output equals the model's up to
floating-point rounding; a draft's rounding never changes what is emitted (the target verifies).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("LlamaDecoderLayer", "Qwen2DecoderLayer")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")  # cos/sin depend on the position only


def unsupported(model) -> str | None:
    """None if :class:`FastLayer` can run ``model`` (a one-layer causal LM); else the reason it cannot."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or len(layers) != 1:
        return "not a one-layer decoder"
    layer = layers[0]
    if type(layer).__name__ not in SUPPORTED:
        return f"{type(layer).__name__} is not one of {list(SUPPORTED)}"
    if getattr(layer.self_attn, "sliding_window", None):
        return "sliding-window attention"
    rope = getattr(getattr(inner, "rotary_emb", None), "rope_type", None)
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} is not one of {list(STATIC_ROPE)}"
    if getattr(model.config, "hidden_act", "silu") != "silu":
        return f"hidden_act={model.config.hidden_act!r} (only silu)"
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _cat_bias(*linears) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                      for lin in linears])


class FastLayer:
    """The decoder layer and final norm of a one-layer causal LM ``model``, run directly (see the module).

    Call it with the layer's input ``x [B, n, H]`` (the embedded or fused tokens), the cache layer that
    holds the layer's keys and values, ``position_ids [B, n]`` and a bool ``key_mask [B, 1, n, S]`` (None:
    causal, the block's token i sees every earlier slot and the block's tokens up to i); it returns
    the final-normed hidden states ``[B, n, H]``.
    """

    def __init__(self, model):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"FastLayer cannot run this model: {reason}")
        self.model = model
        self.layer = model.model.layers[0]
        attn = self.layer.self_attn
        config = model.config
        self.heads = int(config.num_attention_heads)
        self.kv_heads = int(getattr(config, "num_key_value_heads", None) or self.heads)
        self.head_dim = int(attn.head_dim)
        self.scaling = float(attn.scaling)
        self._fused_key = None
        self._table_key = None

    # ----------------------------------------------------------------- cached tensors

    def _fused(self) -> tuple:
        """``(w_qkv, b_qkv, w_gate_up, b_gate_up)``, rebuilt when a source weight was replaced or changed."""
        attn, mlp = self.layer.self_attn, self.layer.mlp
        sources = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
        key = tuple((lin.weight.data_ptr(), lin.weight._version, lin.weight.dtype) for lin in sources)
        if key != self._fused_key:
            with torch.no_grad():
                self._w = (torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),  # [(Hq + 2 Hkv) D, H]
                           _cat_bias(attn.q_proj, attn.k_proj, attn.v_proj),
                           torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),  # [2 I, H]
                           _cat_bias(mlp.gate_proj, mlp.up_proj))
            self._fused_key = key
        return self._w

    def _rope(self, size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[size, D]``: the model's rotary module at positions ``0 .. size - 1``."""
        key = (size, dtype, device)
        if key != self._table_key:
            positions = torch.arange(size, device=device)[None]  # [1, size]
            with torch.no_grad():
                cos, sin = self.model.model.rotary_emb(torch.zeros(1, dtype=dtype, device=device), positions)
            self._table, self._table_key = (cos[0], sin[0]), key  # [size, D] each
        return self._table

    # ----------------------------------------------------------------- the forward

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, cache_layer, position_ids: torch.Tensor,
                 key_mask: torch.Tensor | None = None) -> torch.Tensor:
        layer = self.layer
        b, n, _ = x.shape
        w_qkv, b_qkv, w_gu, b_gu = self._fused()
        h = _rms(x, layer.input_layernorm)
        qkv = F.linear(h, w_qkv, b_qkv)  # [B, n, (Hq + 2 Hkv) D]
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # [B, Hq, n, D]
        k = k.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, n, D]
        v = v.view(b, n, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, n, D]
        cos, sin = self._rope(cache_layer.get_max_cache_shape(), x.dtype, x.device)
        cos, sin = cos[position_ids][:, None], sin[position_ids][:, None]  # [B, 1, n, D]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = cache_layer.update(k, v)  # [B, Hkv, S, D] each, this block included
        out = self._attend(q, keys, values, key_mask)  # [B, n, Hq D]
        o_proj = layer.self_attn.o_proj
        x = x + F.linear(out, o_proj.weight, o_proj.bias)  # [B, n, H]
        gate, up = F.linear(_rms(x, layer.post_attention_layernorm), w_gu, b_gu).chunk(2, dim=-1)  # [B, n, I] each
        down = layer.mlp.down_proj
        x = x + F.linear(F.silu(gate) * up, down.weight, down.bias)  # [B, n, H]
        return _rms(x, self.model.model.norm)  # [B, n, H]

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
