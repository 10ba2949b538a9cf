"""specdec: a research framework for speculative decoding.

Public API (stable)::

    from specdec import SpeculativeDecoder, SamplingParams
    decoder = SpeculativeDecoder(target=model, drafter=drafter, acceptance="rejection",
                                 sampling=SamplingParams(temperature=1.0), attn_backend="sdpa")
    out = decoder.generate(input_ids, max_new_tokens=64, seed=0)
"""
from specdec.acceptance import AcceptanceRule, get_rule
from specdec.decoder import DecodeOutput, SpeculativeDecoder
from specdec.drafting import DraftContext, Drafter, StepShape
from specdec.errors import ConfigError, SpecDecError
from specdec.sampling import SamplingParams
from specdec.stats import DecodeStats
from specdec.types import AcceptResult, DraftTree, VerifyOutput

__all__ = [
    "AcceptResult", "AcceptanceRule", "ConfigError", "DecodeOutput", "DecodeStats", "DraftContext", "DraftTree",
    "Drafter", "SamplingParams", "SpecDecError", "SpeculativeDecoder", "StepShape", "VerifyOutput",
    "get_rule",
]
