"""Decoding strategies in pure numpy, driven through small callbacks (no model or backend knowledge).

- ``beam``: paper-parity beam search (Hugging Face semantics), optionally constrained;
- ``trie``: token trie of multi-token item ids, an ``allowed_tokens`` hook for constrained beam search;
- ``sampling``: greedy / temperature / top-p, and the step-wise ``TokenGenerator`` that streams tokens;
- ``detokenize``: incremental detokenization that never splits a character;
- ``itemslice``: one-step top-k over the item-token slice, rating and selection distributions.
"""

from runtime.decoding.beam import BeamResult, BeamSearchConfig, beam_search
from runtime.decoding.detokenize import IncrementalDetokenizer, StrippedPieces
from runtime.decoding.itemslice import (
    RatingDistribution,
    Selection,
    TopItems,
    admissible_items,
    hypothesis_items,
    item_topk,
    rating_distribution,
    select_candidates,
)
from runtime.decoding.sampling import SamplingConfig, TokenGenerator, greedy_token, sample_token, top_p_filter
from runtime.decoding.trie import TokenTrie

__all__ = [
    "BeamResult",
    "BeamSearchConfig",
    "IncrementalDetokenizer",
    "RatingDistribution",
    "SamplingConfig",
    "Selection",
    "StrippedPieces",
    "TokenGenerator",
    "TokenTrie",
    "TopItems",
    "admissible_items",
    "beam_search",
    "greedy_token",
    "hypothesis_items",
    "item_topk",
    "rating_distribution",
    "sample_token",
    "select_candidates",
    "top_p_filter",
]
