"""Greedy outputs checked against the target's own argmax, for targets in reduced precision.

In float32 a greedy speculative run equals plain greedy decoding token for token, and the benchmarks
check exactly that. In bfloat16 it cannot: bf16 logits near 30 are spaced 0.125 apart, so the argmax
of two equally valid computations (a verify of 5 tokens against a forward of one, HF's
``generate`` against our loop) differs wherever the top two logits nearly tie, and from there the
texts part. HF's own prompt lookup parts from HF plain greedy the same way.

What can be checked is that every emitted token is the target's argmax up to rounding: the
*deficit* of a token is ``max(z) - z[token]``, with ``z`` the logits of the same weights computed in
float32 (teacher-forced over the output), and an output passes if its largest deficit is within a
tolerance of a few bf16 spacings. A drafter whose wrong token slipped through acceptance shows a
deficit of whole logits.
"""
from __future__ import annotations

import copy
import sys

import torch


def float32_reference(target):
    """A float32 copy of ``target`` (the same weights, computed in float32); ``target`` itself if it is float32."""
    if target.get_output_embeddings().weight.dtype == torch.float32:
        return target
    return copy.deepcopy(target).float().eval()


@torch.inference_mode()
def greedy_deficit(reference, output: torch.Tensor, prompt_len: int) -> float:
    """Largest ``max(z) - z[token]`` over the generated tokens of ``output [1, T]`` (logits ``z`` of
    ``reference``, teacher-forced); 0.0 when nothing was generated."""
    if output.shape[1] <= prompt_len:
        return 0.0
    z = reference(input_ids=output[:, :-1]).logits[0, prompt_len - 1:].float()  # [new, V]
    chosen = z.gather(-1, output[0, prompt_len:, None]).squeeze(-1)  # [new]
    return float((z.max(-1).values - chosen).max())


def deficits(reference, outputs: dict, prompts: list[torch.Tensor]) -> dict[int, float]:
    """Per prompt index: the greedy deficit of ``outputs[i]`` for prompt ``prompts[i] [1, P]``."""
    return {i: greedy_deficit(reference, out, prompts[i].shape[1]) for i, out in outputs.items()}


#: The largest deficit an output may show and count as greedy up to rounding. bf16 logits of 16-32 are spaced
#: 0.125 apart, and the rounding of the layers before them moves a logit of 30 by a few tenths: on SmolLM2 in
#: bf16, HF's own prompt lookup and assisted generation show deficits of 0.27 against the same weights in
#: float32. A wrongly accepted token costs whole logits.
TOLERANCE = 0.5


def rounding_check(target, prompts: dict, outputs: dict, question_ids: list, tolerance: float = TOLERANCE) -> dict:
    """For a greedy run in reduced precision whose outputs differ from the baseline's: the largest greedy
    deficit over those prompts' outputs (``prompts[qid] [1, P]``, ``outputs[qid]``: new token ids) and
    whether it is within ``tolerance``; an empty dict for a float32 target or when nothing differs."""
    if not question_ids or target.get_output_embeddings().weight.dtype == torch.float32:
        return {}
    reference = float32_reference(target)
    worst = 0.0
    for qid in question_ids:
        ids = prompts[qid]  # [1, P]
        full = torch.cat([ids, torch.tensor([outputs[qid]], dtype=ids.dtype, device=ids.device)], dim=1)  # [1, P + new]
        worst = max(worst, greedy_deficit(reference, full, ids.shape[1]))
    return {"greedy_deficit": worst, "greedy_up_to_rounding": worst <= tolerance}


if __name__ == "__main__":  # a library module: say which commands use it instead of exiting 0 silently
    print("error: experiments.greedy_check is not a command: decode and the benchmarks run it on reduced-precision "
          "targets (e.g. python -m experiments.decode model.dtype=bfloat16)", file=sys.stderr)
    sys.exit(2)
