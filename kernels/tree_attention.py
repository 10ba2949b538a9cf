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
  small kernel merges.
* Tiles entirely inside the prefix take an unmasked fast path; the remaining tiles
  apply the boundary and the tree mask, which each program packs once into one int64
  bitmask per tree row (hence ``N <= 64``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

MAX_TREE_TOKENS = 64  # one int64 bitmask word per tree row

__all__ = ["tree_attention", "tree_attention_ref", "MAX_TREE_TOKENS"]


@triton.jit
def _attn_tile(acc, m_i, l_i, q, k_base, v_base, start_n, prefix, n_tree, end, bits,
               stride_ks, stride_kd, stride_vs, stride_vd, offs_d, d_valid, qk_scale,
               MASKED: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr,
               DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """Online-softmax update of (acc, m_i, l_i) with one K/V tile starting at ``start_n``."""
    offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    k_ptrs = k_base + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd  # [BLOCK_N, BLOCK_D]
    v_ptrs = v_base + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd  # [BLOCK_N, BLOCK_D]
    if MASKED:
        kv_valid = offs_n < end  # [BLOCK_N]
        if EVEN_D:
            k = tl.load(k_ptrs, mask=kv_valid[:, None], other=0.0)  # [BLOCK_N, BLOCK_D]
            v = tl.load(v_ptrs, mask=kv_valid[:, None], other=0.0)  # [BLOCK_N, BLOCK_D]
        else:
            k = tl.load(k_ptrs, mask=kv_valid[:, None] & d_valid[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=kv_valid[:, None] & d_valid[None, :], other=0.0)
    elif EVEN_D:  # hot path: whole tile inside the prefix, no masks at all
        k = tl.load(k_ptrs)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptrs)  # [BLOCK_N, BLOCK_D]
    else:
        k = tl.load(k_ptrs, mask=d_valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=d_valid[None, :], other=0.0)
    if DOT_FP32:  # interpreter: its tl.dot cannot multiply bf16
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    if MASKED:
        rel = offs_n - prefix  # [BLOCK_N] position inside the tree
        in_tree = (rel >= 0) & (rel < n_tree) & kv_valid  # [BLOCK_N]
        shift = tl.where(in_tree, rel, 0).to(tl.int64)  # [BLOCK_N]
        bit = (bits[:, None] >> shift[None, :]) & 1  # [BLOCK_M, BLOCK_N]
        visible = ((offs_n < prefix) & kv_valid)[None, :] | (in_tree[None, :] & (bit != 0))
        s = tl.where(visible, s, float("-inf"))  # [BLOCK_M, BLOCK_N]
    m_new = tl.maximum(m_i, tl.max(s, 1))  # [BLOCK_M]
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    alpha = tl.exp2(m_i - m_safe)  # [BLOCK_M]
    p = tl.exp2(s - m_safe[:, None])  # [BLOCK_M, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, 1)
    p_in = p.to(v_base.dtype.element_ty).to(v.dtype)  # round like the GPU path
    acc = acc * alpha[:, None] + tl.dot(p_in, v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["prefix_scalar"])  # the prefix grows every step: no recompiles
def _tree_attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, mask_ptr, prefix_ptr, prefix_scalar,
                   ws_acc_ptr, ws_ml_ptr,
                   n_tree, hkv, group, num_splits, m_pad, qk_scale,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd,
                   stride_ob, stride_oh, stride_on, stride_od, stride_mi, stride_mj,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, TREE_P2: tl.constexpr, PREFIX_IS_TENSOR: tl.constexpr,
                   SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """First pass: one (M-block, batch * KV head, split) per program."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // hkv
    h_kv = pid_bh % hkv
    if PREFIX_IS_TENSOR:
        prefix = tl.load(prefix_ptr + b).to(tl.int32)
    else:
        prefix = prefix_scalar
    total = prefix + n_tree  # visible slots: [0, total)
    tiles_per_split = tl.cdiv(tl.cdiv(total, BLOCK_N), num_splits)
    start = pid_s * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, total)
    mid = tl.maximum(start, tl.minimum(end, (prefix // BLOCK_N) * BLOCK_N))  # unmasked below

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] (head-in-group, token) pairs
    row_valid = rows < group * n_tree
    tok = rows % n_tree  # [BLOCK_M]
    head = h_kv * group + rows // n_tree  # [BLOCK_M]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    d_valid = offs_d < HEAD_DIM

    b64 = b.to(tl.int64)
    q_rows = b64 * stride_qb + head.to(tl.int64) * stride_qh + tok * stride_qn  # [BLOCK_M]
    q = tl.load(q_ptr + q_rows[:, None] + offs_d[None, :] * stride_qd,
                mask=row_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)
    offs_j = tl.arange(0, TREE_P2)  # [TREE_P2] tree columns
    tm = tl.load(mask_ptr + tok[:, None] * stride_mi + offs_j[None, :] * stride_mj,
                 mask=row_valid[:, None] & (offs_j < n_tree)[None, :], other=0)  # [BLOCK_M, TREE_P2]
    bits = tl.sum(tm.to(tl.int64) << offs_j.to(tl.int64)[None, :], 1)  # [BLOCK_M] row bitmask
    k_base = k_ptr + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh
    v_base = v_ptr + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BLOCK_M]
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BLOCK_M, BLOCK_D]
    for start_n in range(start, mid, BLOCK_N):  # tiles fully inside the prefix
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_base, v_base, start_n, prefix, n_tree,
                                   end, bits, stride_ks, stride_kd, stride_vs, stride_vd,
                                   offs_d, d_valid, qk_scale, False, BLOCK_D == HEAD_DIM, BLOCK_N,
                                   DOT_PRECISION, DOT_FP32)
    for start_n in range(mid, end, BLOCK_N):  # prefix boundary and tree tiles
        acc, m_i, l_i = _attn_tile(acc, m_i, l_i, q, k_base, v_base, start_n, prefix, n_tree,
                                   end, bits, stride_ks, stride_kd, stride_vs, stride_vd,
                                   offs_d, d_valid, qk_scale, True, BLOCK_D == HEAD_DIM, BLOCK_N,
                                   DOT_PRECISION, DOT_FP32)

    if SPLIT:
        ws_row = (pid_bh * num_splits + pid_s).to(tl.int64) * m_pad + rows  # [BLOCK_M]
        tl.store(ws_acc_ptr + ws_row[:, None] * BLOCK_D + offs_d[None, :], acc)
        tl.store(ws_ml_ptr + ws_row * 2, m_i)
        tl.store(ws_ml_ptr + ws_row * 2 + 1, l_i)
    else:
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_D]
        o_rows = b64 * stride_ob + head.to(tl.int64) * stride_oh + tok * stride_on  # [BLOCK_M]
        tl.store(o_ptr + o_rows[:, None] + offs_d[None, :] * stride_od,
                 out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _tree_attn_merge(o_ptr, ws_acc_ptr, ws_ml_ptr, n_tree, hkv, group, num_splits, m_pad,
                     stride_ob, stride_oh, stride_on, stride_od,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """Second pass: merge the per-split (acc, max, sum) of one (M-block, batch * KV head)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // hkv
    h_kv = pid_bh % hkv
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    row_valid = rows < group * n_tree
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    m_all = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BLOCK_M]
    l_all = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BLOCK_M, BLOCK_D]
    for s in range(0, num_splits):
        ws_row = (pid_bh * num_splits + s).to(tl.int64) * m_pad + rows  # [BLOCK_M]
        m_s = tl.load(ws_ml_ptr + ws_row * 2)  # [BLOCK_M]
        l_s = tl.load(ws_ml_ptr + ws_row * 2 + 1)  # [BLOCK_M]
        a_s = tl.load(ws_acc_ptr + ws_row[:, None] * BLOCK_D + offs_d[None, :])  # [BLOCK_M, BLOCK_D]
        m_new = tl.maximum(m_all, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_all - m_safe)  # [BLOCK_M]
        beta = tl.exp2(m_s - m_safe)  # [BLOCK_M]
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        l_all = l_all * alpha + l_s * beta
        m_all = m_new
    l_safe = tl.where(l_all > 0.0, l_all, 1.0)
    out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_D]
    head = h_kv * group + rows // n_tree  # [BLOCK_M]
    tok = rows % n_tree  # [BLOCK_M]
    o_rows = b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + tok * stride_on
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty),
             mask=row_valid[:, None] & (offs_d < HEAD_DIM)[None, :])


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
    if not isinstance(tree_mask, torch.Tensor) or tuple(tree_mask.shape) != (N, N):
        got = tuple(tree_mask.shape) if isinstance(tree_mask, torch.Tensor) else type(tree_mask).__name__
        raise ValueError(f"tree_attention: tree_mask must have shape [N, N] = [{N}, {N}], got {got}")
    if tree_mask.dtype != torch.bool:
        raise ValueError(f"tree_attention: tree_mask must have dtype torch.bool "
                         f"(true = may attend), got {tree_mask.dtype}")
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
    return (type(_tree_attn_fwd).__name__ == "InterpretedFunction"
            and type(tl.cdiv).__name__ == "InterpretedFunction")


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: small, but enough to exercise split-K on long prefixes


def _pick_num_splits(n_programs, total_max, rows, elem_bytes, block_n, num_sms):
    """Split the KV sequence until there are ~2 programs per SM, keeping >= 2 tiles per split
    and the fp32 workspace traffic (written, then read back from L2) below the K/V traffic."""
    if n_programs >= num_sms:
        return 1
    splits = triton.cdiv(2 * num_sms, n_programs)
    splits = min(splits, max(1, total_max // (2 * block_n)))
    splits = min(splits, max(1, (total_max * elem_bytes) // (4 * rows)))
    return max(1, min(splits, 128))


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
    """
    B, Hq, Hkv, N, S, D, prefix = _check_inputs(q, k, v, prefix_len, tree_mask)
    if N > MAX_TREE_TOKENS:
        raise ValueError(f"tree_attention: at most {MAX_TREE_TOKENS} tree tokens are supported "
                         f"(the tree mask is packed in one int64 per row), got N={N}")
    if tree_mask.device != q.device:
        raise ValueError(f"tree_attention: tree_mask is on {tree_mask.device}, q on {q.device}")
    is_tensor = isinstance(prefix, torch.Tensor)
    if is_tensor and prefix.device != q.device:
        raise ValueError(f"tree_attention: prefix_len is on {prefix.device}, q on {q.device}")
    if validate or not is_tensor:
        total_max = _check_bounds(prefix, N, S) + N
    else:
        total_max = S
    if q.device.type != "cuda" and not _is_interpreted():
        raise RuntimeError("tree_attention: the Triton kernel needs CUDA tensors on a GPU; to run "
                           "it on the CPU set TRITON_INTERPRET=1 in the environment before triton "
                           "is first imported (or use tree_attention_ref)")
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)

    G = Hq // Hkv
    rows = G * N
    BLOCK_D = max(16, triton.next_power_of_2(D))
    if q.dtype == torch.float32:  # exact fp32 dots run on FMA units: small tiles, no spills
        max_m, BLOCK_N = 16, (32 if BLOCK_D <= 128 else 16)
    else:  # fp16/bf16 tensor cores (wgmma from BLOCK_M = 64 on Hopper)
        max_m, BLOCK_N = (128, 64) if BLOCK_D <= 128 else (64, 32)
    BLOCK_M = min(max(16, triton.next_power_of_2(rows)), max_m)
    n_mblocks = triton.cdiv(rows, BLOCK_M)
    if num_splits is None:
        num_splits = _pick_num_splits(n_mblocks * B * Hkv, total_max, rows, q.element_size(),
                                      BLOCK_N, _num_sms(q.device))
    num_splits = max(1, int(num_splits))

    mask_u8 = tree_mask.view(torch.uint8)  # [N, N] packed into int64 rows inside the kernel
    out = torch.empty_like(q)  # [B, Hq, N, D]
    m_pad = n_mblocks * BLOCK_M
    if num_splits > 1:
        ws_acc = torch.empty(B * Hkv * num_splits * m_pad * BLOCK_D, dtype=torch.float32,
                             device=q.device)  # [B*Hkv, splits, m_pad, BLOCK_D]
        ws_ml = torch.empty(B * Hkv * num_splits * m_pad * 2, dtype=torch.float32,
                            device=q.device)  # [B*Hkv, splits, m_pad, 2]
    else:
        ws_acc = ws_ml = out  # unused
    prefix_t = prefix if is_tensor else mask_u8  # dummy pointer when the prefix is an int
    dot_fp32 = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and _is_interpreted())
    num_warps = 8 if BLOCK_M * BLOCK_D >= 128 * 128 else 4
    grid = (n_mblocks, B * Hkv, num_splits)
    _tree_attn_fwd[grid](
        q, k, v, out, mask_u8, prefix_t, 0 if is_tensor else prefix, ws_acc, ws_ml,
        N, Hkv, G, num_splits, m_pad, sm_scale * 1.4426950408889634,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_u8.stride(),
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
        TREE_P2=max(16, triton.next_power_of_2(N)),
        PREFIX_IS_TENSOR=is_tensor, SPLIT=num_splits > 1,
        DOT_PRECISION="ieee" if dot_fp32 else "tf32", DOT_FP32=dot_fp32,
        num_warps=num_warps, num_stages=2)
    if num_splits > 1:
        MERGE_M = 16  # divides m_pad; keeps the merge's fp32 tiles in registers
        _tree_attn_merge[(m_pad // MERGE_M, B * Hkv)](
            out, ws_acc, ws_ml, N, Hkv, G, num_splits, m_pad, *out.stride(),
            HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=MERGE_M, num_warps=4)
    return out


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
