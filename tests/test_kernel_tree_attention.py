"""Triton tree attention against its PyTorch reference.

Runs on the GPU when CUDA is available, otherwise on the CPU under the Triton interpreter
(``TRITON_INTERPRET=1`` is set here, before the kernels are imported). The interpreter
must be chosen before triton's first import; when something imported triton earlier in
this pytest process (transformers does), the whole file reruns in a fresh process.
"""
import os
import random

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when @triton.jit runs, i.e. at triton's import

import importlib

import pytest

ta = importlib.import_module("specdec_kernels.tree_attention")  # the module, not the re-exported function
from specdec_kernels import TreeAttentionPlan, pack_tree_mask, tree_attention, tree_attention_ref
from tests.triton_env import DEVICE, fresh_process_test, interpreter_guard

_needs_interpreter = interpreter_guard()
test_file_in_fresh_process = fresh_process_test(__file__)


TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 1e-2), torch.bfloat16: (3e-2, 3e-2)}


def tree_mask_from_parents(parents):
    """Ancestor-and-self mask ``[N, N]`` of a tree given as a parent array (root: -1)."""
    n = len(parents)
    mask = torch.zeros(n, n, dtype=torch.bool)  # [N, N]
    for i in range(n):
        j = i
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
    return mask.to(DEVICE)


def random_parents(rng, n):
    return [-1] + [rng.randrange(i) for i in range(1, n)]


def make_inputs(seed, B, Hq, Hkv, N, prefixes, S, D, dtype):
    """Random q/k/v with NaN / huge garbage in every slot at or past prefix + N."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, N, D, generator=g).to(dtype)  # [B, Hq, N, D]
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)  # [B, Hkv, S, D]
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)  # [B, Hkv, S, D]
    huge = torch.finfo(dtype).max
    for b, p in enumerate(prefixes):
        k[b, :, p + N:] = float("nan")
        v[b, :, p + N:] = huge
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def check(q, k, v, prefix, mask, sm_scale=None, **kw):
    out = tree_attention(q, k, v, prefix, mask, sm_scale, **kw)  # [B, Hq, N, D]
    ref = tree_attention_ref(q, k, v, prefix, mask, sm_scale)  # [B, Hq, N, D]
    assert out.dtype == q.dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    atol, rtol = TOL[q.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)
    return out


def _random_cases(n_cases, seed=1234):
    rng = random.Random(seed)
    cases = []
    for c in range(n_cases):
        G = rng.choice([1, 4, 8])
        Hkv = rng.choice([1, 1, 2])
        N = rng.choice([1, 2, 5, 8, 16, 31, 64]) if c % 3 else rng.randint(1, 64)
        P = rng.choice([0, 1, 63, 64, 200, 777, 1024, 2048]) if c % 2 else rng.randint(0, 2048)
        D = rng.choice([64, 128])
        dtype = [torch.float32, torch.float16, torch.bfloat16][c % 3]
        extra = rng.choice([0, 1, 37, 128])
        B = 2 if c % 4 == 3 else 1  # B = 2 gets a per-batch tensor prefix
        prefixes = [P, rng.randint(0, P)] if B == 2 else [P]
        cases.append((c, B, G, Hkv, N, prefixes, D, dtype, extra))
    return cases


def _case_id(c):
    return "B{1}-G{2}-Hkv{3}-N{4}-P{5}-D{6}-{7}".format(
        *c[:5], "_".join(map(str, c[5])), *c[6:8]).replace("torch.", "")


@pytest.mark.parametrize("case", _random_cases(32), ids=_case_id)
def test_random_trees_match_reference(case):
    c, B, G, Hkv, N, prefixes, D, dtype, extra = case
    rng = random.Random(c)
    q, k, v = make_inputs(c, B, G * Hkv, Hkv, N, prefixes, max(prefixes) + N + extra, D, dtype)
    prefix = torch.tensor(prefixes, device=DEVICE) if B == 2 else prefixes[0]
    check(q, k, v, prefix, tree_mask_from_parents(random_parents(rng, N)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prefix_dtype", [torch.int32, torch.int64])
def test_per_batch_tensor_prefix(dtype, prefix_dtype):
    rng = random.Random(7)
    N, prefixes, S = 12, [300, 45], 400
    q, k, v = make_inputs(3, 2, 8, 2, N, prefixes, S, 64, dtype)
    mask = tree_mask_from_parents(random_parents(rng, N))
    prefix = torch.tensor(prefixes, dtype=prefix_dtype, device=DEVICE)
    out = check(q, k, v, prefix, mask)
    # each batch row equals a B=1 call with its own int prefix
    for b, p in enumerate(prefixes):
        one = tree_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], p, mask)  # [1, Hq, N, D]
        torch.testing.assert_close(out[b:b + 1].float(), one.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])
    check(q, k, v, prefix, mask, validate=False)  # no host sync: grid sized from S


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40])
def test_split_k_is_exact(num_splits):
    rng = random.Random(11)
    N, P = 9, 1500
    q, k, v = make_inputs(5, 1, 8, 2, N, [P], P + N + 20, 128, torch.float32)
    mask = tree_mask_from_parents(random_parents(rng, N))
    check(q, k, v, P, mask, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_merge_equals_the_merge_kernel_launch_after_launch(dtype):
    """``merge="fused"``: the last split of each (M-block, KV head) merges in the attention kernel itself. Two KV
    heads of 3 M-blocks each, 7 splits (the last ones empty for the shorter prefix), per-row prefixes that change
    between launches: every launch equals the reference and the two-kernel merge, and each arrival count is back
    at 0 after every launch (the next launch, or the next layer, starts from it)."""
    rng = random.Random(13)
    N, prefixes, D = 24, [700, 90], 64  # G * N = 4 * 24 = 96 rows: 3 M-blocks of 32
    q, k, v = make_inputs(13, 2, 8, 2, N, [760, 760], 800, D, dtype)
    mask = tree_mask_from_parents(random_parents(rng, N))
    fused = TreeAttentionPlan(torch.tensor(prefixes, device=DEVICE), mask, num_splits=7,
                              config={"merge": "fused", "block_m": 32})
    kernel = TreeAttentionPlan(torch.tensor(prefixes, device=DEVICE), mask, num_splits=7, config={"block_m": 32})
    for step in range(3):
        fused.prefix_len.add_(step * 20)
        kernel.prefix_len.copy_(fused.prefix_len)
        out = fused(q, k, v)  # [2, 8, N, D]
        assert not ta._WORKSPACES[(q.device, torch.int32)][: 2 * 2 * 3].any(), step
        ref = tree_attention_ref(q, k, v, fused.prefix_len, mask)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])
        torch.testing.assert_close(out.float(), kernel(q, k, v).float(), atol=TOL[dtype][0], rtol=TOL[dtype][1])


def test_default_tiles_follow_the_rows_up_to_the_tuned_maximum():
    """``default_config``'s M-block: the tree's rows rounded up to a power of two, at least 16, at most the tuned
    maximum (128 rows for bf16/fp16 at head dim <= 128, 64 beyond; 16 for exact fp32 dots)."""
    from specdec_kernels.choices import default_config

    for dtype, head_dim, rows, block_m in ((torch.bfloat16, 128, 4, 16), (torch.bfloat16, 128, 40, 64),
                                           (torch.bfloat16, 128, 512, 128), (torch.float16, 256, 512, 64),
                                           (torch.float32, 128, 100, 16), (torch.float32, 64, 8, 16)):
        config = default_config(dtype, head_dim, rows)
        assert config["block_m"] == block_m, (dtype, head_dim, rows, config)
        assert config["programs_per_sm"] == (2 if rows > block_m else 1)
    assert default_config(torch.bfloat16, 128, 64)["merge"] == "kernel"  # the fused merge waits for a GPU's say


def test_split_rounding_bounds_the_programs_per_sm():
    """``split_rounding``: ``up`` aims for at least ``programs_per_sm`` programs per SM, ``down`` for at most
    (no SM running one program more than the others); both keep two tiles per split."""
    pick = ta._pick_num_splits
    for n_programs, sms in ((8, 132), (32, 132), (3, 4), (7, 100)):
        up = pick(n_programs, 1 << 20, 4, 2, 64, sms, 1, "up")
        down = pick(n_programs, 1 << 20, 4, 2, 64, sms, 1, "down")
        assert n_programs * down <= sms <= n_programs * up, (n_programs, sms, up, down)
        assert up - down <= 1
    assert pick(8, 64 * 6, 4, 2, 64, 132, 1, "down") == 3  # 6 tiles: at most 3 splits of 2
    with pytest.raises(ValueError, match="split_rounding='sideways'"):
        TreeAttentionPlan(10, torch.ones(1, 1, dtype=torch.bool, device=DEVICE), config={"split_rounding": "sideways"})(
            *make_inputs(0, 1, 1, 1, 1, [10], 12, 16, torch.float32))


@pytest.mark.parametrize("D", [16, 32, 96, 256])
def test_other_head_dims(D):
    rng = random.Random(D)
    N, P = 6, 130
    q, k, v = make_inputs(D, 1, 4, 1, N, [P], P + N + 3, D, torch.float16)
    check(q, k, v, P, tree_mask_from_parents(random_parents(rng, N)))


def test_many_rows_span_several_m_blocks():
    """G * N = 8 * 40 = 320 rows: several M-blocks per KV head (and bit 63 unused/used)."""
    rng = random.Random(3)
    for dtype, N in ((torch.float32, 40), (torch.float16, 64)):
        q, k, v = make_inputs(N, 1, 8, 1, N, [100], 100 + N + 5, 64, dtype)
        check(q, k, v, 100, tree_mask_from_parents(random_parents(rng, N)))


def test_one_m_block_of_256_rows():
    """``block_m`` 256 (a launch choice ``specdec_kernels.tune`` tries for trees of 256 rows: K/V read once)."""
    rng = random.Random(5)
    q, k, v = make_inputs(256, 1, 32, 8, 64, [300], 300 + 64 + 7, 128, torch.bfloat16)  # G * N = 4 * 64
    mask = tree_mask_from_parents(random_parents(rng, 64))
    out = TreeAttentionPlan(300, mask, config={"block_m": 256, "num_warps": 8})(q, k, v)  # [1, 32, 64, 128]
    ref = tree_attention_ref(q, k, v, 300, mask)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


def test_the_rows_operator_reads_each_rows_prefix_on_the_device():
    """``specdec::tree_attention_rows`` (the fixed-shape step's attention): per-row prefixes as a tensor, the tree
    packed, nothing validated on the host; equal to the reference row by row."""
    from specdec_kernels.rows import tree_attention_rows

    rng = random.Random(9)
    N, prefixes = 5, [200, 37, 120]
    q, k, v = make_inputs(9, 3, 8, 2, N, prefixes, 256, 64, torch.float16)
    mask = tree_mask_from_parents(random_parents(rng, N))
    prefix = torch.tensor(prefixes, device=DEVICE)
    out = tree_attention_rows(q, k, v, prefix, pack_tree_mask(mask.to(DEVICE)), 0.125)
    ref = tree_attention_ref(q, k, v, prefix, mask, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1])




def test_the_rows_operator_keeps_a_bounded_number_of_layouts(monkeypatch):
    """Each KV capacity is a layout of its own (``compile=static`` does not round capacities up): past
    ``MAX_LAUNCHES`` the kept launches are dropped and rebuilt on demand, with the same results."""
    from specdec_kernels import rows

    monkeypatch.setattr(rows, "_LAUNCHES", {})
    monkeypatch.setattr(rows, "MAX_LAUNCHES", 2)
    mask = tree_mask_from_parents([-1, 0, 0])
    for capacity in (64, 80, 96, 64):
        q, k, v = make_inputs(capacity, 1, 4, 2, 3, [40], capacity, 32, torch.float32)
        prefix = torch.tensor([40], device=DEVICE)
        out = rows.tree_attention_rows(q, k, v, prefix, pack_tree_mask(mask), 0.2)
        torch.testing.assert_close(out, tree_attention_ref(q, k, v, prefix, mask, 0.2), atol=2e-5, rtol=2e-5)
        assert len(rows._LAUNCHES) <= 2

def test_direct_launches_equal_the_jits_and_follow_alignment(monkeypatch):
    """After its first launch a layout's launches skip Triton's JIT (:mod:`specdec_kernels.launch`; on a GPU only,
    the interpreter has no compiled kernel): with new prefixes each step, and with a query 2 bytes off the
    first one's alignment, every output equals the reference and, bit for bit, a launch through the JIT."""
    rng = random.Random(4)
    N, prefixes, S, D = 6, [150, 40], 200, 64
    q, k, v = make_inputs(4, 2, 8, 2, N, [190, 190], S, D, torch.float16)
    mask = tree_mask_from_parents(random_parents(rng, N))
    bits, prefix = pack_tree_mask(mask), torch.tensor(prefixes, device=DEVICE)
    launch = ta.rows_launch(q, k, v, prefix, bits, 0.125)
    store = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)
    shifted = store[1:].view_as(q)  # the same layout, 2 bytes off 16-byte alignment
    shifted.copy_(q)
    outs = []
    for step, query in enumerate((q, q, shifted, shifted, q)):
        prefix.copy_(torch.tensor([p + 7 * step for p in prefixes]))
        out = launch(query, k, v, bits, prefix)
        ref = tree_attention_ref(q, k, v, prefix, mask, 0.125)
        torch.testing.assert_close(out.float(), ref.float(), atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1])
        outs.append(out)
    assert (launch.kernels[0].runner is not None) == (DEVICE == "cuda")  # the attention kernel's launcher kept
    monkeypatch.setenv("SPECDEC_TRITON_DIRECT", "0")
    through_jit = ta.rows_launch(q, k, v, prefix, bits, 0.125)
    for step, query in enumerate((q, q, shifted, shifted, q)):
        prefix.copy_(torch.tensor([p + 7 * step for p in prefixes]))
        assert torch.equal(through_jit(query, k, v, bits, prefix), outs[step]), step

def test_chain_equals_causal_attention():
    N, P, D = 7, 50, 64
    q, k, v = make_inputs(0, 1, 2, 2, N, [P], P + N, D, torch.float32)
    chain = tree_mask_from_parents([-1] + list(range(N - 1)))
    out = tree_attention(q, k, v, P, chain, 0.3)  # [1, 2, N, D]
    causal = torch.ones(N, P + N, dtype=torch.bool, device=DEVICE).tril(P)  # [N, P + N]
    expect = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=0.3)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=2e-5)


def test_noncontiguous_inputs_and_arbitrary_mask():
    """Strided q (as after a [B, N, H, D] -> [B, H, N, D] transpose) and a non-tree mask."""
    N, P, D = 10, 70, 64
    g = torch.Generator().manual_seed(9)
    q = torch.randn(1, N, 4, D, generator=g).to(DEVICE).transpose(1, 2)  # [1, 4, N, D] strided
    kv = torch.randn(1, 90, 2, 2, D, generator=g).to(DEVICE)  # [1, S, 2, Hkv, D]
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)  # [1, 2, S, D] strided
    mask = torch.rand(N, N, generator=g).to(DEVICE) < 0.4  # [N, N]
    mask |= torch.eye(N, dtype=torch.bool, device=DEVICE)
    check(q, k, v, P, mask)


def test_row_without_visible_keys_is_zero():
    N, D = 3, 64
    q, k, v = make_inputs(4, 1, 1, 1, N, [0], N, D, torch.float32)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]], device=DEVICE)
    out = check(q, k, v, 0, mask)
    assert (out[0, 0, 1] == 0).all()


# ------------------------------------------------------------------ bad inputs


def _ok_inputs(N=4, P=8, S=16, Hq=4, Hkv=2, D=64):
    q, k, v = make_inputs(0, 1, Hq, Hkv, N, [P], S, D, torch.float32)
    return q, k, v, P, tree_mask_from_parents([-1] + list(range(N - 1)))


@pytest.mark.parametrize("fn", [tree_attention, tree_attention_ref])
def test_bad_inputs_raise_value_error(fn):
    q, k, v, P, mask = _ok_inputs()
    with pytest.raises(ValueError, match=r"tree_mask must have shape \[N, N\]"):
        fn(q, k, v, P, mask[:3])
    with pytest.raises(ValueError, match="tree_mask must have dtype torch.bool"):
        fn(q, k, v, P, mask.int())
    with pytest.raises(ValueError, match="q must be a 4-D tensor"):
        fn(q[0], k, v, P, mask)
    with pytest.raises(ValueError, match="k must be a 4-D tensor"):
        fn(q, k[0], v, P, mask)
    with pytest.raises(ValueError, match="head-dim mismatch"):
        fn(q[..., :32], k, v, P, mask)
    with pytest.raises(ValueError, match="not divisible"):
        fn(q[:, :3], k, v, P, mask)
    with pytest.raises(ValueError, match="exceeds the KV length"):
        fn(q, k, v, 13, mask)
    with pytest.raises(ValueError, match="exceeds the KV length"):
        fn(q, k, v, torch.tensor([13], device=DEVICE), mask)
    with pytest.raises(ValueError, match="prefix_len must be"):
        fn(q, k, v, torch.tensor([1, 2], device=DEVICE), mask)
    with pytest.raises(ValueError, match="share one dtype"):
        fn(q.half(), k, v, P, mask)


def test_too_many_tree_tokens():
    q, k, v, P, mask = _ok_inputs(N=65, P=0, S=80, Hq=1, Hkv=1, D=16)
    with pytest.raises(ValueError, match="at most 64 tree tokens"):
        tree_attention(q, k, v, P, mask)


def test_cpu_without_interpreter_raises(monkeypatch):
    q, k, v, P, mask = _ok_inputs()
    monkeypatch.setattr(ta, "_is_interpreted", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tree_attention(q.cpu(), k.cpu(), v.cpu(), P, mask.cpu())


def test_cpu_with_an_interpreter_that_cannot_run_raises(monkeypatch):
    """An interpreter known not to run here (triton < 3.7 with numpy >= 2.4) is named before the launch."""
    q, k, v, P, mask = _ok_inputs()
    monkeypatch.setattr(ta, "_is_interpreted", lambda: True)
    monkeypatch.setattr(ta, "interpreter_problem", lambda: "triton 3.6.0's interpreter cannot run with numpy 2.4.6")
    with pytest.raises(RuntimeError, match="cannot run with numpy 2.4.6 .or use tree_attention_ref"):
        tree_attention(q.cpu(), k.cpu(), v.cpu(), P, mask.cpu())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the benchmark runs its full sweep (scripts/gpu_check.sh)")
def test_benchmark_smoke_run_without_a_gpu(tmp_path):
    """``python -m specdec_kernels.bench --interpret-smoke`` as a user runs it without a GPU: exit 0, a JSON
    with a row per method and tree width, and SDPA's output equal to the kernel's in every row."""
    import json
    import subprocess
    import sys

    out = tmp_path / "smoke.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "specdec_kernels.bench", "--interpret-smoke", "--json", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    methods = ("triton", "triton_fused", "triton_1x", "sdpa")
    assert {(r["method"], r["N"]) for r in rows} == {(m, n) for m in methods for n in (1, 4)}
    assert all(r["max_abs_diff_vs_triton"] < 1e-4 for r in rows)
