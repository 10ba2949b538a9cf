"""Mutation pass 21: the batched decode loop and its drafters (``specdec/batch_decoder.py``,
``specdec/batch_drafting.py``, ``drafters/batch_chain.py``, ``drafters/draft_model_batch.py``), the kept compiled
steps (``specdec/static_kept.py``), the lean draft forward (``drafters/fast_decoder.py``), checkpoint diagnosis
(``specdec/checkpoints.py``) and model loading / device checks (``specdec/models.py``). Most planted bugs there were
caught by the existing tests; the tests here catch the ones that were not. Each test names the planted bug it
catches."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from drafters import DraftModelDrafter
from drafters.fast_decoder import fast_decoder, forward_lm
from specdec import SamplingParams, SpecDecError, SpeculativeDecoder
from specdec.batch_drafting import keyed_rows
from specdec.cache import SpecDecCache
from specdec.checkpoints import (
    CheckpointError,
    RemoteCodeError,
    check_finite_weights,
    load_failure,
    safetensors_problem,
)
from specdec.drafting import DraftContext
from specdec.models import check_device
from specdec.static_kept import step_for
from specdec.static_step import capacity_for
from specdec.types import AcceptResult
from tests.tiny_models import noisy_copy, pair, prompts

# --------------------------------------------------------------------------- batched draft-model chains: kept drafts


def test_a_chain_cut_by_confidence_keeps_only_the_drafts_its_batch_one_run_fed():
    """Row 0's chain ends after one draft (unsure) while row 1 drafts 4, so the batch feeds row 0's draft too. After
    a commit accepting it, row 0's draft cache keeps only what a batch-1 run would have fed (its prompt and root, not
    the draft, which is re-fed with the bonus token next step); row 1 keeps its 2 accepted fed drafts (planted bugs:
    ``fed = k`` instead of ``k - 1``, or ``seen`` ignoring ``fed``, keep row 0's batch-fed draft)."""
    target, _, tok = pair("llama")
    rows = [ids[0].tolist() for ids in prompts(tok, 2, seed=4)]
    chain = DraftModelDrafter(noisy_copy("llama"), num_speculative_tokens=4, confidence_threshold=0.5).batched()
    chain.start(DraftContext(target, SamplingParams(), keyed_rows([0, 1], "cpu"), 96))
    chain.extend(rows, None)
    chain.drafter.unsure = lambda logits, q, tok, sampling: torch.tensor([True, False])  # row 0 stops at draft 1
    trees = chain.propose([8, 8])
    assert chain.drafted == [1, 4] and [t.num_nodes for t in trees] == [1, 4]
    assert list(chain.cache.host_lengths) == [len(rows[0]) + 3, len(rows[1]) + 3]  # the batch fed 3 drafts per row
    results = [AcceptResult(accepted_nodes=[0], tokens=trees[0].tokens.tolist() + [7]),
               AcceptResult(accepted_nodes=[0, 1], tokens=trees[1].tokens[:2].tolist() + [7])]
    chain.commit(results, None)
    assert list(chain.cache.host_lengths) == [len(rows[0]), len(rows[1]) + 2]

# --------------------------------------------------------------------------- the lean forward's rotary table


def test_the_rope_table_is_rebuilt_for_a_larger_cache():
    """A lean forward on an 8-slot cache, then on a 64-slot one at positions 0..39: the rotary table follows the
    capacity and the logits equal the model's own forward (planted bug: the table keyed on dtype and device only
    keeps 8 positions, and position 8 on indexes past it)."""
    draft = copy.deepcopy(pair("llama")[1])
    assert fast_decoder(draft) is not None
    ids = torch.arange(3, 43)[None]  # [1, 40]
    forward_lm(draft, ids[:, :4], SpecDecCache.for_model(draft, 8), torch.arange(4)[None])
    fast, slow = (forward_lm(draft, ids, SpecDecCache.for_model(draft, 64), torch.arange(40)[None], None, 0, f)[0]
                  for f in (True, False))
    torch.testing.assert_close(fast, slow, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------- checkpoint diagnosis


def test_a_file_cut_inside_its_header_is_named_truncated(tmp_path):
    """A safetensors file cut 3 bytes before its header's end says the header is truncated, with the bytes it has
    after the 8-byte length (planted bug: comparing the header length with the whole file's size lets it through
    to a JSON error that does not say the file was cut short)."""
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.ones(4, 3)}, str(path))
    whole = path.read_bytes()
    header_len = int.from_bytes(whole[:8], "little")
    path.write_bytes(whole[: 8 + header_len - 3])
    assert safetensors_problem(path) == (f"truncated: its header needs {header_len} bytes, the file has "
                                         f"{header_len - 3} after the length")


def test_a_config_with_auto_map_is_remote_code_whatever_the_error_says(tmp_path):
    """A checkpoint whose config.json has ``auto_map`` failed to load: that is the remote-code error even where
    transformers' message does not mention ``trust_remote_code`` (planted bug: only the message is read, and the
    user is told something else is wrong with the checkpoint)."""
    config = {"model_type": "my_lm", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyForCausalLM"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    failure = load_failure("draft", str(tmp_path), ValueError("Unrecognized model in this directory"))
    assert isinstance(failure, RemoteCodeError) and failure.role == "draft"


def test_pickle_weights_beside_safetensors_are_not_named_the_only_weights(tmp_path):
    """A directory with a whole model.safetensors and a stray pytorch_model.bin that failed for another reason is
    not told it has only pickle weights (planted bug: ``_pickle_only`` no longer checks for safetensors)."""
    save_file({"a.weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    failure = str(load_failure("target", str(tmp_path), OSError("boom")))
    assert "only pickle" not in failure and failure.startswith(f"could not load the target model from {str(tmp_path)!r}")


# --------------------------------------------------------------------------- device checks


def test_a_gpu_index_one_past_the_last_is_refused(monkeypatch):
    """With 2 GPUs visible, cuda:1 is the last one and cuda:2 is refused naming the range (planted bug: ``index >
    device_count`` lets cuda:2 through, to fail later inside torch)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(SpecDecError, match=r"model.device=cuda:2: only 2 GPU\(s\) visible; use cuda:0 .. cuda:1"):
        check_device("cuda:2")


def test_offloaded_meta_parameters_are_skipped_by_the_finite_check(tmp_path):
    """A model spread by a ``device_map`` has parameters on the ``meta`` device: they are skipped, the others still
    checked (planted bug: the ``meta`` skip dropped, and reading a meta tensor's values fails the load)."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 2, device="meta"), torch.nn.Linear(2, 2))
    check_finite_weights(model, "target", tmp_path)
    with torch.no_grad():
        model[1].bias[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"target checkpoint .* holds NaN weights \(first in 1.bias\)"):
        check_finite_weights(model, "target", tmp_path)


# --------------------------------------------------------------------------- kept compiled steps


def test_a_kept_steps_capacity_bucket_counts_the_drafts_nodes():
    """Two batches whose rows fit the same 128-slot bucket but only one of them with its 3 draft nodes: the second
    gets a step of its own, wide enough (planted bug: the key's capacity without the tree's nodes hands the second
    batch the first's 128-slot step, whose blocks then run past its capacity)."""
    decoder = SpeculativeDecoder(pair("llama")[0], DraftModelDrafter(noisy_copy("llama"), 3), compile="graph")
    rows = [[3, 4, 5], [6, 7]]
    short = step_for(decoder, rows, [10, 10], [0, 1], "graph")
    long = step_for(decoder, rows, [122, 122], [0, 1], "graph")  # 3 + 122 + 2 slots fit 128, not with 3 nodes
    assert short.seq.shape[1] == 128 and long is not short
    assert long.seq.shape[1] == capacity_for(rows, [122, 122], 3, "graph") == 256
