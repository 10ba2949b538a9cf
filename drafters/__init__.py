"""Drafters behind one protocol (:class:`specdec.drafting.Drafter`): one module per drafter."""
from drafters.cross_tokenizer import CrossTokenizerDrafter
from drafters.draft_model import DraftModelDrafter
from drafters.eagle import EagleDrafter
from drafters.hybrid import HybridDrafter
from drafters.layer_skip import LayerSkipDrafter
from drafters.medusa import MedusaDrafter
from drafters.ngram import NGramDrafter
from drafters.none import NoDrafter

__all__ = ["CrossTokenizerDrafter", "DraftModelDrafter", "EagleDrafter", "HybridDrafter", "LayerSkipDrafter",
           "MedusaDrafter", "NGramDrafter", "NoDrafter"]
