"""Tree attention for one-pass speculative verification (Triton, forward only).

Semantics (shared by the kernel and the reference ``tree_attention_ref``):

* ``q``: ``[B, Hq, N, D]`` -- the N tree tokens (root + draft nodes) of every batch row.
* ``k``, ``v``: ``[B, Hkv, S, D]`` -- the KV cache. The tree's own keys sit at slots
  ``prefix_len .. prefix_len + N``; slots at or past ``prefix_len + N`` are never read.
* Key slot ``s < prefix_len`` is visible to every query; key slot ``prefix_len + j`` is
  visible to query ``i`` iff ``tree_mask[i, j]``. A query row with no visible key
  returns zeros.
* GQA: ``Hq = G * Hkv``; query head ``h`` uses KV head ``h // G``.

Kernel design (flash-decoding with the tree in the M dimension):

* One program owns one (M-block, batch, KV head, KV split). Its M rows are the
  ``G * N`` (query head of the KV group, tree token) pairs, row ``r`` -> head
  ``hkv * G + r // N``, token ``r % N``. Every K/V tile is therefore loaded once for all
  tree tokens and all query heads that share it (once per M-block when ``G * N`` is
  larger than ``BLOCK_M``), not once per query.
* The ``prefix_len + N`` visible slots are cut into ``num_splits`` contiguous chunks of
  whole ``BLOCK_N`` tiles (split-K) so that small ``B * Hkv`` still fills the GPU. Each
  split keeps an fp32 online softmax (base-2) and, when there is more than one split,
  writes its unnormalised accumulator and (max, sum) to a workspace that a second
  small kernel merges (one program per output row, all splits loaded at once).
* Tiles entirely inside the prefix take an unmasked fast path; the remaining tiles
  apply the boundary and the tree mask, packed once per verify step into one int64
  bitmask per tree row (:func:`pack_tree_mask`; hence ``N <= 64``).

Launching (host side): a :class:`TreeAttentionPlan` holds what every layer of one verify
step shares -- the packed mask, the prefix, and per input layout the validated launch
configuration (tile sizes, split count, grid, strides, cached split-K workspaces) -- so a
layer's call is a dictionary lookup plus the kernel launch(es): no validation, no mask
packing, no workspace allocation and no host synchronisation. :func:`tree_attention` is the
one-off form (a plan used once, with full validation). The launch choices are :mod:`specdec_kernels.choices`'s
(``CONFIG_KEYS`` and ``default_config`` are re-exported here).
"""
from __future__ import annotations

import math

import torch
import triton

from specdec_kernels._tree_attention_jit import MAX_TREE_TOKENS, _tree_attn_fwd, _tree_attn_merge
from specdec_kernels.choices import CONFIG_KEYS, _config, _num_sms, _pick_num_splits, default_config  # noqa: F401
from specdec_kernels.launch import FixedLaunch

__all__ = ["MAX_TREE_TOKENS", "TreeAttentionPlan", "pack_tree_mask", "tree_attention", "tree_attention_ref"]


# --------------------------------------------------------------------------- launcher


def _check_inputs(q, k, v, prefix_len, tree_mask):
    """Validate shapes/dtypes; return (B, Hq, Hkv, N, S, D, prefix) with prefix an int or tensor."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"tree_attention: {name} must be a 4-D tensor "
                             f"([B, H, N|S, D]), got {got}")
    B, Hq, N, D = q.shape
    if k.shape != v.shape:
        raise ValueError(f"tree_attention: k and v must have the same shape [B, Hkv, S, D], "
                         f"got k {tuple(k.shape)} and v {tuple(v.shape)}")
    Bk, Hkv, S, Dk = k.shape
    if Bk != B:
        raise ValueError(f"tree_attention: batch mismatch: q has B={B}, k/v have B={Bk}")
    if Dk != D:
        raise ValueError(f"tree_attention: head-dim mismatch: q has D={D}, k/v have D={Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"tree_attention: Hq={Hq} query heads are not divisible by "
                         f"Hkv={Hkv} KV heads (GQA needs Hq = G * Hkv)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"tree_attention: q, k, v must share one dtype, got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"tree_attention: dtype must be float32, float16 or bfloat16, "
                         f"got {q.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"tree_attention: q, k, v must be on one device, got "
                         f"{q.device}, {k.device}, {v.device}")
    if N < 1:
        raise ValueError("tree_attention: q must hold at least one tree token (N >= 1)")
    if tree_mask is not None:  # None: rows_launch, whose tree comes packed
        _check_tree_mask(tree_mask, N)
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() == 0:
            prefix_len = int(prefix_len.item())
        elif tuple(prefix_len.shape) != (B,) or prefix_len.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tree_attention: a tensor prefix_len must be int32/int64 of shape "
                             f"[B] = [{B}], got {prefix_len.dtype} {tuple(prefix_len.shape)}")
    elif isinstance(prefix_len, bool) or not isinstance(prefix_len, int):
        raise ValueError(f"tree_attention: prefix_len must be an int or an int tensor [B], "
                         f"got {type(prefix_len).__name__}")
    return B, Hq, Hkv, N, S, D, prefix_len


def _check_tree_mask(tree_mask, N: int) -> None:
    if not isinstance(tree_mask, torch.Tensor) or tuple(tree_mask.shape) != (N, N):
        got = tuple(tree_mask.shape) if isinstance(tree_mask, torch.Tensor) else type(tree_mask).__name__
        raise ValueError(f"tree_attention: tree_mask must have shape [N, N] = [{N}, {N}], got {got}")
    if tree_mask.dtype != torch.bool:
        raise ValueError(f"tree_attention: tree_mask must have dtype torch.bool "
                         f"(true = may attend), got {tree_mask.dtype}")


def _check_bounds(prefix, N, S):
    """Raise ValueError unless 0 <= prefix and prefix + N <= S (syncs for a tensor prefix)."""
    if isinstance(prefix, torch.Tensor):
        lo, hi = (int(x) for x in torch.aminmax(prefix))  # one host sync
    else:
        lo = hi = prefix
    if lo < 0:
        raise ValueError(f"tree_attention: prefix_len must be >= 0, got {lo}")
    if hi + N > S:
        raise ValueError(f"tree_attention: prefix_len + N = {hi} + {N} = {hi + N} exceeds the "
                         f"KV length S = {S}; the tree's keys must already be in the cache")
    return hi


def _is_interpreted() -> bool:
    """True when this module's kernels and triton's own @jit helpers run in the interpreter
    (TRITON_INTERPRET=1 was set before triton was first imported)."""
    import triton.language as tl

    return (type(_tree_attn_fwd).__name__ == "InterpretedFunction"
            and type(tl.cdiv).__name__ == "InterpretedFunction")


def _release(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``3.6.0`` or ``2.4.0rc1``."""
    major, minor = (text.split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run these kernels in this environment, or None.

    triton < 3.7's interpreter turns a program id into a Python int with ``int()`` of a one-element
    array, which numpy >= 2.4 refuses: every kernel launch fails (triton issue 9171, fixed in 3.7)."""
    from importlib.metadata import version

    numpy_version = version("numpy")
    if _release(triton.__version__) < (3, 7) and _release(numpy_version) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run with numpy {numpy_version} (triton issue "
                "9171): pip install 'triton>=3.7' (or 'numpy<2.4') to run the kernel on the CPU")
    return None


def pack_tree_mask(tree_mask: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` bool -> ``[N]`` int64: bit ``j`` of row ``i`` is ``tree_mask[i, j]`` (``N <= 64``).

    Built once per verify step and shared by every layer's kernel call. Distinct powers of two
    never carry, so the sum is the bitwise OR (bit 63 wraps to the sign bit, as intended).
    """
    n = tree_mask.shape[0]
    if n > MAX_TREE_TOKENS:
        raise ValueError(f"tree_attention: at most {MAX_TREE_TOKENS} tree tokens are supported "
                         f"(the tree mask is packed in one int64 per row), got N={n}")
    weights = torch.ones(n, dtype=torch.int64, device=tree_mask.device) << torch.arange(
        n, dtype=torch.int64, device=tree_mask.device)  # [N]
    return (tree_mask.to(torch.int64) * weights).sum(-1)  # [N]


_WORKSPACES: dict = {}  # (device, dtype) -> the largest split-K workspace asked for yet, shared by every plan
_RETIRED: list = []  # the buffers it replaced: a captured graph may still replay with their addresses


def _workspace(device: torch.device, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``[numel]`` scratch, zeros when made: the front of one buffer per device and dtype that grows (at least
    doubling) to the largest request. A replaced buffer is kept for the life of the process, as a CUDA graph
    that captured a launch holds its address and nothing else: in all at most twice the largest. Plans use it
    one launch at a time, in stream order: a split's partials are written, then merged, before the next
    launch writes; an arrival count is back at 0 when its launch ends."""
    buf = _WORKSPACES.get((device, dtype))
    if buf is None or buf.numel() < numel:
        size = numel if buf is None else max(numel, 2 * buf.numel())
        if buf is not None:
            _RETIRED.append(buf)
        buf = _WORKSPACES[(device, dtype)] = torch.zeros(size, dtype=dtype, device=device)
    return buf[:numel]


class TreeAttentionPlan:
    """One verify step's tree, ready to be applied by every layer.

    Args:
        prefix_len: python int, or int32/int64 tensor ``[B]`` (per-batch prefix).
        tree_mask: bool ``[N, N]``; ``tree_mask[i, j]`` = tree token i may attend to j.
        num_splits: force the number of KV splits (split-K); default: a heuristic.
        validate: check ``prefix_len + N <= S`` for a tensor prefix (one host sync, on the first
            call of each input layout only).
        config: override some of :func:`default_config`'s launch choices (keys :data:`CONFIG_KEYS`).
        reuse_output: every call of one layout writes the same output tensor (no allocation per call): a
            call's output is valid until the next call of that layout. For a model's layers, each of which
            consumes its attention output before the next layer's call.

    ``plan(q, k, v, sm_scale)`` computes :func:`tree_attention`. The first call for an input
    layout (shapes, strides, dtype, device) validates it and builds the launch configuration;
    later calls with the same layout (the other layers of the step) only launch.
    """

    def __init__(self, prefix_len, tree_mask: torch.Tensor, num_splits: int | None = None, validate: bool = True,
                 config: dict | None = None, reuse_output: bool = False):
        self.prefix_len, self.tree_mask = prefix_len, tree_mask
        self.num_splits, self.validate, self.config = num_splits, validate, config
        self.reuse_output = reuse_output
        self.bits: torch.Tensor | None = None  # [N] int64, packed on the first call
        self._launches: dict = {}

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float | None = None) -> torch.Tensor:
        key = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, q.device, sm_scale)
        launch = self._launches.get(key)
        if launch is None:
            launch = self._launches[key] = self._configure(q, k, v, sm_scale)
        return launch(q, k, v)

    def _configure(self, q, k, v, sm_scale):
        """Validate one input layout and return the function that launches for it."""
        B, Hq, Hkv, N, S, D, prefix = _check_inputs(q, k, v, self.prefix_len, self.tree_mask)
        if N > MAX_TREE_TOKENS:
            raise ValueError(f"tree_attention: at most {MAX_TREE_TOKENS} tree tokens are supported "
                             f"(the tree mask is packed in one int64 per row), got N={N}")
        if self.tree_mask.device != q.device:
            raise ValueError(f"tree_attention: tree_mask is on {self.tree_mask.device}, q on {q.device}")
        is_tensor = isinstance(prefix, torch.Tensor)
        if is_tensor and prefix.device != q.device:
            raise ValueError(f"tree_attention: prefix_len is on {prefix.device}, q on {q.device}")
        total_max = _check_bounds(prefix, N, S) + N if self.validate or not is_tensor else S
        if q.device.type != "cuda" and not _is_interpreted():
            raise RuntimeError("tree_attention: the Triton kernel needs CUDA tensors on a GPU; to run "
                               "it on the CPU set TRITON_INTERPRET=1 in the environment before triton "
                               "is first imported (or use tree_attention_ref)")
        problem = interpreter_problem() if q.device.type != "cuda" else None
        if problem:
            raise RuntimeError(f"tree_attention: {problem} (or use tree_attention_ref)")
        if self.bits is None:
            self.bits = pack_tree_mask(self.tree_mask)  # [N]
        config = _config(q.dtype, D, (Hq // Hkv) * N, self.config)
        return _make_launch(q, k, v, B, Hq, Hkv, N, D, prefix, self.bits, total_max,
                            1.0 / math.sqrt(D) if sm_scale is None else sm_scale, self.num_splits, config,
                            self.reuse_output)


def _make_launch(q, k, v, B, Hq, Hkv, N, D, prefix, bits, total_max, sm_scale, num_splits, config,
                 reuse_output=False):
    """Tile sizes, split count, grid and workspaces for one layout; returns ``launch(q, k, v) -> out`` (with
    ``reuse_output``, the same ``out`` every launch)."""
    G = Hq // Hkv
    rows = G * N
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_M, BLOCK_N = config["block_m"], config["block_n"]
    n_mblocks = triton.cdiv(rows, BLOCK_M)
    if num_splits is None:
        num_splits = _pick_num_splits(n_mblocks * B * Hkv, total_max, rows, q.element_size(), BLOCK_N,
                                      _num_sms(q.device), config["programs_per_sm"], config["split_rounding"])
    num_splits = max(1, int(num_splits))
    m_pad = n_mblocks * BLOCK_M
    split = num_splits > 1
    fused = split and config["merge"] == "fused"
    ws_acc = ws_ml = count = bits  # no split: unused pointers
    if split:
        partials = B * Hkv * num_splits * m_pad  # rows of partial results
        ws = _workspace(q.device, partials * (BLOCK_D + 2))
        ws_acc, ws_ml = ws[: partials * BLOCK_D], ws[partials * BLOCK_D :]  # [B*Hkv, S, m_pad, BD], [.., 2]
    if fused:
        count = _workspace(q.device, B * Hkv * n_mblocks, torch.int32)  # [B*Hkv, M-blocks] arrivals, 0 between launches
    is_tensor = isinstance(prefix, torch.Tensor)
    prefix_t, prefix_i = (prefix, 0) if is_tensor else (bits, prefix)  # bits: dummy pointer for an int prefix
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _is_interpreted())
    strides = (*q.stride(), *k.stride(), *v.stride())
    kept = torch.empty_like(q) if reuse_output else None  # [B, Hq, N, D]
    out_strides = (kept if kept is not None else torch.empty_like(q)).stride()
    consts = dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PREFIX_IS_TENSOR=is_tensor,
                  SPLIT=split, FUSED_MERGE=fused, DOT_PRECISION="ieee" if dot_fp32 else "tf32", DOT_FP32=dot_fp32,
                  num_warps=config["num_warps"], num_stages=config["num_stages"])
    grid, merge_grid = (n_mblocks, B * Hkv, num_splits), (rows, B * Hkv)  # merge: one row per program
    block_s = triton.next_power_of_2(num_splits)
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): the kernel works in base 2

    fwd = FixedLaunch(_tree_attn_fwd, grid, consts)
    merge = FixedLaunch(_tree_attn_merge, merge_grid, dict(HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_S=block_s,
                                                           num_warps=8 if block_s * BLOCK_D >= 64 * 128 else 4))

    def launch(q, k, v, bits=bits, prefix_t=prefix_t):  # rows_launch's callers pass their own (same shapes)
        out = torch.empty_like(q) if kept is None else kept  # [B, Hq, N, D]
        fwd(q, k, v, out, bits, prefix_t, prefix_i, ws_acc, ws_ml, count, N, Hkv, G, num_splits, m_pad, qk_scale,
            *strides, *out_strides)
        if split and not fused:
            merge(out, ws_acc, ws_ml, N, Hkv, G, num_splits, m_pad, *out_strides)
        return out

    launch.kernels = (fwd, merge)

    return launch


def rows_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix: torch.Tensor, bits: torch.Tensor,
                sm_scale: float) -> object:
    """``launch(q, k, v, bits, prefix) -> out`` for one input layout of a fixed-shape step: ``prefix`` an int
    tensor ``[B]`` (each row's cached length, never read back: the caller guarantees ``prefix + N <= S``) and
    ``bits`` the packed tree ``[N]`` (:func:`pack_tree_mask`), both passed again at every launch."""
    B, Hq, Hkv, N, S, D, prefix = _check_inputs(q, k, v, prefix, None)
    if N > MAX_TREE_TOKENS or tuple(bits.shape) != (N,):
        raise ValueError(f"tree_attention: {N} tree tokens need a packed mask of shape [{N}] (N <= "
                         f"{MAX_TREE_TOKENS}), got {tuple(bits.shape)}")
    if not isinstance(prefix, torch.Tensor):
        raise ValueError("tree_attention: rows_launch takes the prefix as an int tensor [B]")
    if q.device.type != "cuda" and not _is_interpreted():
        raise RuntimeError("tree_attention: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1)")
    config = _config(q.dtype, D, (Hq // Hkv) * N, None)
    return _make_launch(q, k, v, B, Hq, Hkv, N, D, prefix, bits, S, sm_scale, None, config)


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len, tree_mask: torch.Tensor,
                   sm_scale: float | None = None, *, num_splits: int | None = None,
                   validate: bool = True) -> torch.Tensor:
    """Tree-masked attention of N tree tokens against a KV cache (Triton, forward only).

    Args:
        q: ``[B, Hq, N, D]`` queries of the tree tokens (fp32, fp16 or bf16).
        k, v: ``[B, Hkv, S, D]`` KV cache; the tree's keys are at slots
            ``prefix_len .. prefix_len + N``; later slots are ignored (never read).
        prefix_len: python int, or int32/int64 tensor ``[B]`` (per-batch prefix).
        tree_mask: bool ``[N, N]``; ``tree_mask[i, j]`` = tree token i may attend to j.
        sm_scale: softmax scale, default ``1 / sqrt(D)``.
        num_splits: force the number of KV splits (split-K); default: a heuristic.
        validate: check ``prefix_len + N <= S`` for a tensor prefix (one host sync).

    Returns:
        ``[B, Hq, N, D]`` in q's dtype. Rows with no visible key are zeros.

    Every layer of a model calls the kernel with the same tree: build one
    :class:`TreeAttentionPlan` per step and call it per layer to skip the per-call setup.
    """
    return TreeAttentionPlan(prefix_len, tree_mask, num_splits, validate)(q, k, v, sm_scale)


def tree_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_len, tree_mask: torch.Tensor,
                       sm_scale: float | None = None) -> torch.Tensor:
    """Plain-PyTorch reference of ``tree_attention`` (same arguments and semantics).

    Computes in fp32 per batch row, reading only slots ``< prefix_len + N``; returns q's
    dtype. Rows with no visible key are zeros.
    """
    B, Hq, Hkv, N, S, D, prefix = _check_inputs(q, k, v, prefix_len, tree_mask)
    _check_bounds(prefix, N, S)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)
    G = Hq // Hkv
    prefixes = prefix.tolist() if isinstance(prefix, torch.Tensor) else [prefix] * B
    tm = tree_mask.to(q.device)  # [N, N]
    out = torch.empty_like(q)  # [B, Hq, N, D]
    for b, p in enumerate(prefixes):
        kb = k[b, :, : p + N].float().repeat_interleave(G, dim=0)  # [Hq, L, D]
        vb = v[b, :, : p + N].float().repeat_interleave(G, dim=0)  # [Hq, L, D]
        scores = q[b].float() @ kb.transpose(-1, -2) * sm_scale  # [Hq, N, L]
        allowed = torch.cat([torch.ones(N, p, dtype=torch.bool, device=q.device), tm], 1)  # [N, L]
        scores = scores.masked_fill(~allowed, float("-inf"))  # [Hq, N, L]
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # [Hq, N, L]; empty rows -> 0
        out[b] = (probs @ vb).to(q.dtype)  # [Hq, N, D]
    return out
