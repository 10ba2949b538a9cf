"""Triton kernels of tree attention (see :mod:`specdec_kernels.tree_attention` for semantics and the launcher)."""
from __future__ import annotations

import triton
import triton.language as tl

MAX_TREE_TOKENS = 64  # one int64 bitmask word per tree row


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


@triton.jit
def _store_rows(o_ptr, acc, l_i, b64, head, tok, offs_d, row_valid, d_valid,
                stride_ob, stride_oh, stride_on, stride_od):
    """Normalise ``acc [BLOCK_M, BLOCK_D]`` by ``l_i [BLOCK_M]`` and store the valid rows (none visible: zeros)."""
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_safe[:, None]  # [BLOCK_M, BLOCK_D]
    o_rows = b64 * stride_ob + head.to(tl.int64) * stride_oh + tok * stride_on  # [BLOCK_M]
    tl.store(o_ptr + o_rows[:, None] + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


@triton.jit
def _merge_rows(ws_acc_ptr, ws_ml_ptr, first, num_splits, m_pad, rows, row_valid, offs_d,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Combine the ``num_splits`` partial (acc, max, sum) of rows ``rows`` stored from workspace row
    ``first * m_pad`` on; returns the merged ``(acc [BLOCK_M, BLOCK_D], sum [BLOCK_M])``. Loads skip L1
    (``.cg``): other programs wrote these rows during this launch."""
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # [BLOCK_M]
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # [BLOCK_M]
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # [BLOCK_M, BLOCK_D]
    for s in range(num_splits):
        ws_row = (first + s).to(tl.int64) * m_pad + rows  # [BLOCK_M]
        m_s = tl.load(ws_ml_ptr + ws_row * 2, mask=row_valid, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(ws_ml_ptr + ws_row * 2 + 1, mask=row_valid, other=0.0, cache_modifier=".cg")
        a_s = tl.load(ws_acc_ptr + ws_row[:, None] * BLOCK_D + offs_d[None, :], mask=row_valid[:, None],
                      other=0.0, cache_modifier=".cg")  # [BLOCK_M, BLOCK_D]
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible in either yet
        alpha = tl.exp2(m - m_safe)  # [BLOCK_M]
        beta = tl.exp2(m_s - m_safe)  # [BLOCK_M]
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        l_i = l_i * alpha + l_s * beta
        m = m_new
    return acc, l_i


@triton.jit(do_not_specialize=["prefix_scalar"])  # the prefix grows every step: no recompiles
def _tree_attn_fwd(q_ptr, k_ptr, v_ptr, o_ptr, bits_ptr, prefix_ptr, prefix_scalar,
                   ws_acc_ptr, ws_ml_ptr, count_ptr,
                   n_tree, hkv, group, num_splits, m_pad, qk_scale,
                   stride_qb, stride_qh, stride_qn, stride_qd,
                   stride_kb, stride_kh, stride_ks, stride_kd,
                   stride_vb, stride_vh, stride_vs, stride_vd,
                   stride_ob, stride_oh, stride_on, stride_od,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, PREFIX_IS_TENSOR: tl.constexpr,
                   SPLIT: tl.constexpr, FUSED_MERGE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """First pass: one (M-block, batch * KV head, split) per program. With ``FUSED_MERGE`` the last split of an
    (M-block, batch * KV head) to finish merges all of them (an arrival count per pair in ``count_ptr``, left at
    0 for the next launch) and no second kernel runs."""
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
    bits = tl.load(bits_ptr + tok, mask=row_valid, other=0)  # [BLOCK_M] int64 row bitmask
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
        if FUSED_MERGE:
            tl.debug_barrier()  # every thread's partials are stored before the count says so
            pair = pid_bh * tl.num_programs(0) + pid_m  # this (M-block, batch * KV head)
            arrived = tl.atomic_add(count_ptr + pair, 1, sem="acq_rel")  # releases ours, acquires the others'
            if arrived == num_splits - 1:  # the last to finish: every other split's partials are visible
                merged, total = _merge_rows(ws_acc_ptr, ws_ml_ptr, pid_bh * num_splits, num_splits, m_pad, rows,
                                            row_valid, offs_d, BLOCK_M, BLOCK_D)
                _store_rows(o_ptr, merged, total, b64, head, tok, offs_d, row_valid, d_valid,
                            stride_ob, stride_oh, stride_on, stride_od)
                tl.atomic_xchg(count_ptr + pair, 0)  # ready for the next launch
    else:
        _store_rows(o_ptr, acc, l_i, b64, head, tok, offs_d, row_valid, d_valid,
                    stride_ob, stride_oh, stride_on, stride_od)


@triton.jit
def _tree_attn_merge(o_ptr, ws_acc_ptr, ws_ml_ptr, n_tree, hkv, group, num_splits, m_pad,
                     stride_ob, stride_oh, stride_on, stride_od,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Second pass: merge the per-split (acc, max, sum) of one (row, batch * KV head).

    Every split is loaded at once (``BLOCK_S >= num_splits``) and reduced in registers: no loop whose
    iterations wait on each other's loads, so the merge costs about one memory round trip."""
    row = tl.program_id(0)  # one (head-in-group, tree token) row
    pid_bh = tl.program_id(1)
    b = pid_bh // hkv
    h_kv = pid_bh % hkv
    offs_s = tl.arange(0, BLOCK_S)  # [BLOCK_S]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    s_valid = offs_s < num_splits
    ws_row = (pid_bh * num_splits + offs_s).to(tl.int64) * m_pad + row  # [BLOCK_S]
    m_s = tl.load(ws_ml_ptr + ws_row * 2, mask=s_valid, other=float("-inf"))  # [BLOCK_S]
    l_s = tl.load(ws_ml_ptr + ws_row * 2 + 1, mask=s_valid, other=0.0)  # [BLOCK_S]
    a_s = tl.load(ws_acc_ptr + ws_row[:, None] * BLOCK_D + offs_d[None, :],
                  mask=s_valid[:, None], other=0.0)  # [BLOCK_S, BLOCK_D]
    m_all = tl.max(m_s, 0)
    m_safe = tl.where(m_all == float("-inf"), 0.0, m_all)  # a row with nothing visible
    w = tl.exp2(m_s - m_safe)  # [BLOCK_S]; 0 for empty splits
    l_all = tl.sum(l_s * w, 0)
    acc = tl.sum(a_s * w[:, None], 0)  # [BLOCK_D]
    out = acc / tl.where(l_all > 0.0, l_all, 1.0)  # [BLOCK_D]
    head = h_kv * group + row // n_tree
    tok = row % n_tree
    o_row = b.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + tok * stride_on
    tl.store(o_ptr + o_row + offs_d * stride_od, out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)
