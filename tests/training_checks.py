"""What every head training entry point must do, checked the same way for each (Medusa, EAGLE)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file


def assert_resume_is_exact(train, compose, overrides: list[str], tmp_path, capfd, load) -> None:
    """A run interrupted after step 3 (checkpoint at step 2, ``checkpoint_every=2``, ``steps=6``) and
    resumed ends with the same head, tensor for tensor, as an uninterrupted run; ``load(dir)`` loads a head."""

    def interrupt(step):
        if step == 3:
            raise KeyboardInterrupt

    train(compose(*overrides, f"out_dir={tmp_path / 'a'}"), tmp_path / "run_a")
    with pytest.raises(KeyboardInterrupt):
        train(compose(*overrides, f"out_dir={tmp_path / 'b'}"), tmp_path / "run_b", on_step=interrupt)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True, map_location="cpu")["step"] == 2
    capfd.readouterr()
    from experiments import head_data

    generated = any(o.startswith("generated_rows=") and o != "generated_rows=0" for o in overrides)
    kept = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True, map_location="cpu").get("generated_rows")
    assert (kept is not None) == generated  # the rows the target wrote are in the checkpoint
    with pytest.MonkeyPatch.context() as patch:  # a resume reads them back (minutes on a large target)
        patch.setattr(head_data, "generate_rows", lambda *a, **kw: pytest.fail("generated the rows again"))
        train(compose(*overrides, f"out_dir={tmp_path / 'b'}"), tmp_path / "run_b2")
    assert "at step 2/6" in capfd.readouterr().err
    a, b = load(tmp_path / "a").state_dict(), load(tmp_path / "b").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_finished_head_is_reused(train, compose, overrides: list[str], tmp_path, capfd, load) -> None:
    """After :func:`assert_resume_is_exact`: a rerun with the same settings into the finished head's directory
    trains nothing and returns the head's report; ``force=true`` trains it again (seeded: the same tensors), as
    does a rerun over a weights file decoding would refuse (truncated, NaN); other settings train and replace it, saying so."""
    out = tmp_path / "a"
    weights = next(p for p in out.iterdir() if p.suffix == ".safetensors")
    before, stamp = load(out).state_dict(), weights.stat().st_mtime_ns
    capfd.readouterr()
    report = train(compose(*overrides, f"out_dir={out}"), tmp_path / "run_again")
    assert report.get("reused") is True and "nothing to do" in capfd.readouterr().err
    assert weights.stat().st_mtime_ns == stamp and (tmp_path / "run_again" / "eval.json").is_file()
    report = train(compose(*overrides, "force=true", f"out_dir={out}"), tmp_path / "run_forced")
    assert "reused" not in report and weights.stat().st_mtime_ns != stamp
    after = load(out).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # training is seeded: the same head again
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated: decoding says "retrain", so the rerun must train
    capfd.readouterr()
    report = train(compose(*overrides, f"out_dir={out}"), tmp_path / "run_repair")
    assert "reused" not in report and "the head does not load" in capfd.readouterr().err
    assert all(torch.equal(before[k], v) for k, v in load(out).state_dict().items())
    tensors = load_file(weights)
    next(iter(tensors.values())).view(-1)[0] = float("nan")  # reads, but decoding refuses NaN weights
    save_file(tensors, weights)
    report = train(compose(*overrides, f"out_dir={out}"), tmp_path / "run_nan")
    assert "reused" not in report and "holds NaN weights" in capfd.readouterr().err
    steps = [o for o in overrides if not o.startswith("steps=")] + ["steps=5"]
    capfd.readouterr()
    report = train(compose(*steps, f"out_dir={out}"), tmp_path / "run_other")
    assert "reused" not in report and "steps: 6 -> 5" in capfd.readouterr().err
    report = train(compose(*steps, "eval_batch_size=4", f"out_dir={out}"), tmp_path / "run_eval")  # its eval.json
    assert "reused" not in report and "eval_batch_size: 8 -> 4" in capfd.readouterr().err
    report = train(compose(*steps, "eval_batch_size=4", "draft_vocab=6", f"out_dir={out}"), tmp_path / "run_vocab")
    assert "reused" not in report and "draft_vocab: 0 -> 6" in capfd.readouterr().err  # an option set only when on
    report = train(compose(*steps, "eval_batch_size=4", f"out_dir={out}"), tmp_path / "run_back")  # and when off
    assert "reused" not in report and "draft_vocab: 6 -> 0" in capfd.readouterr().err
