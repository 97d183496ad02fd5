"""A token trie over multi-token item ids, for constrained beam search.

UniMP's semantic-ID variant spells every item as a fixed number of tokens; P5-style systems spell ids as
several sub-word tokens. ``TokenTrie.allowed`` is an ``allowed_tokens`` hook for ``beam_search``: after any
prefix of a valid spelling it allows exactly the tokens that continue some item, and after a complete
spelling it allows EOS, so a constrained search only produces valid item ids followed by EOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    item: int = -1
    """Index of the item spelled by the path to this node, or -1."""
    allowed: np.ndarray | None = None
    """Cached int64 [k] of the tokens allowed after this node, sorted."""


class TokenTrie:
    """Prefix tree of token sequences; ``sequences[i]`` spells item ``items[i]`` (default: item ``i``)."""

    def __init__(
        self,
        sequences: Iterable[Sequence[int] | np.ndarray],
        eos_token_id: int,
        items: Iterable[int] | None = None,
    ) -> None:
        """``items``, when given, names the item index of each sequence (default: 0, 1, 2, ...)."""
        self.eos_token_id = int(eos_token_id)
        self._root = _Node()
        self._count = 0
        indices = iter(items) if items is not None else None
        for position, seq in enumerate(sequences):
            index = position if indices is None else int(next(indices, -1))
            if index < 0:
                raise ValueError(f"sequence {position} has no item index (items is shorter, or negative)")
            tokens = [int(t) for t in np.asarray(seq, dtype=np.int64).reshape(-1)]
            if not tokens:
                raise ValueError(f"item {index} has an empty token sequence")
            if self.eos_token_id in tokens:
                raise ValueError(f"item {index} contains the EOS token {self.eos_token_id}")
            node = self._root
            for token in tokens:
                node = node.children.setdefault(token, _Node())
            if node.item >= 0:
                raise ValueError(f"items {node.item} and {index} have the same token sequence {tokens}")
            node.item = index
            self._count += 1
        self._eos_only = np.array([self.eos_token_id], dtype=np.int64)
        self._eos_only.setflags(write=False)

    @classmethod
    def from_array(cls, item_tokens: np.ndarray, eos_token_id: int) -> TokenTrie:
        """From a fixed-width spelling table int64 [num_items, tokens_per_item]."""
        table = np.asarray(item_tokens, dtype=np.int64)
        if table.ndim != 2:
            raise ValueError(f"item_tokens must have shape [num_items, tokens_per_item], got {table.shape}")
        return cls(list(table), eos_token_id)

    @classmethod
    def atomic_items(
        cls, item_start: int, items: np.ndarray | Sequence[int], eos_token_id: int, prefix: Sequence[int] = ()
    ) -> TokenTrie:
        """Items that are one token each (``item_k`` is id ``item_start + k``), spelled after ``prefix`` (the
        tokens every answer starts with, e.g. the whitespace token a byte-level BPE puts before an added
        token): item ``k`` in ``items`` is ``(*prefix, item_start + k)``."""
        index = np.asarray(items, dtype=np.int64).reshape(-1)
        head = [int(t) for t in prefix]
        return cls(([*head, item_start + int(k)] for k in index), eos_token_id, items=index.tolist())

    def __len__(self) -> int:
        return self._count

    def _walk(self, prefix: Sequence[int] | np.ndarray) -> _Node | None:
        node = self._root
        for token in np.asarray(prefix, dtype=np.int64).reshape(-1).tolist():
            child = node.children.get(token)
            if child is None:
                return None
            node = child
        return node

    def allowed(self, prefix: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token ids allowed after ``prefix`` (the generated tokens so far), int64 [k], sorted.

        Children of the prefix's node, plus EOS if the prefix spells a complete item. A prefix that is not
        in the trie (only reachable by a search row that is already at -inf) allows EOS alone, so that
        callers that reject empty lists, as the reference does, never fail on such rows.
        """
        node = self._walk(prefix)
        if node is None:
            return self._eos_only
        if node.allowed is None:
            ids = sorted(node.children)
            if node.item >= 0:
                ids.append(self.eos_token_id)
            allowed = np.array(sorted(ids), dtype=np.int64)
            allowed.setflags(write=False)  # shared between calls
            node.allowed = allowed
        return node.allowed

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Index of the item spelled by ``tokens`` (a trailing EOS is ignored), or -1."""
        seq = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if seq.size and int(seq[-1]) == self.eos_token_id:
            seq = seq[:-1]
        node = self._walk(seq)
        return -1 if node is None else node.item
