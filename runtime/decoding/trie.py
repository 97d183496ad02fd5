"""A token trie over multi-token item ids, for constrained beam search.

UniMP's semantic-ID variant spells every item as a fixed number of tokens; P5-style systems spell ids as
several sub-word tokens. ``TokenTrie.allowed`` is an ``allowed_tokens`` hook for ``beam_search``: after any
prefix of a valid spelling it allows exactly the tokens that continue some item, and after a complete
spelling it allows EOS, so a constrained search only produces valid item ids followed by EOS.

``TokenTrie.masked(admissible)`` restricts a (cached) trie to some of its items without rebuilding it:
items are numbered in lexicographic order of their spellings, so every node covers a contiguous range of
that order, and one prefix sum over the admissible flags gives each node's admissible count in O(1).
The masked view allows exactly the tokens that continue some admissible item.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

_NONE = np.zeros(0, dtype=np.int64)


@dataclass
class _Node:
    children: dict[int, _Node] = field(default_factory=dict)
    item: int = -1
    """Index of the item spelled by the path to this node, or -1."""
    allowed: np.ndarray | None = None
    """Cached int64 [k] of the tokens allowed after this node, sorted."""
    lo: int = 0
    hi: int = 0
    """Items spelled through this node are positions [lo, hi) of the lexicographic order (see build_index)."""
    child_tokens: np.ndarray = field(default_factory=lambda: _NONE)
    """int64 [c] sorted child tokens, with their ranges in child_lo / child_hi (set by build_index)."""
    child_lo: np.ndarray = field(default_factory=lambda: _NONE)
    child_hi: np.ndarray = field(default_factory=lambda: _NONE)


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
        self.max_length = 0
        """Tokens in the longest spelling (EOS not counted)."""
        self._order: np.ndarray | None = None
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
            self.max_length = max(self.max_length, len(tokens))
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

    @classmethod
    def from_sequences(
        cls,
        sequences: np.ndarray | Sequence[Sequence[int]],
        eos_token_id: int,
        items: Iterable[int] | None = None,
        prefix: Sequence[int] = (),
    ) -> TokenTrie:
        """Items spelled by several tokens each (semantic ids, sub-word ids) after ``prefix`` (as in
        ``atomic_items``): item ``items[i]`` (default ``i``) is ``(*prefix, *sequences[i])``."""
        head = [int(t) for t in prefix]
        spelled = ([*head, *(int(t) for t in np.asarray(seq, dtype=np.int64).reshape(-1))] for seq in sequences)
        return cls(spelled, eos_token_id, items=items)

    def __len__(self) -> int:
        return self._count

    def build_index(self) -> np.ndarray:
        """int64 [count]: item indices in lexicographic order of their spellings (a node's own item before
        its descendants); sets every node's range and child arrays. Computed once, on first use; call it
        before sharing the trie between threads (masked views then only read it)."""
        if self._order is not None:
            return self._order
        order: list[int] = []
        stack: list[tuple[_Node, bool]] = [(self._root, False)]
        while stack:
            node, leaving = stack.pop()
            if leaving:
                node.hi = len(order)
                kids = sorted(node.children.items())
                node.child_tokens = np.array([t for t, _ in kids], dtype=np.int64)
                node.child_lo = np.array([c.lo for _, c in kids], dtype=np.int64)
                node.child_hi = np.array([c.hi for _, c in kids], dtype=np.int64)
                continue
            node.lo = len(order)
            if node.item >= 0:
                order.append(node.item)
            stack.append((node, True))
            for _, child in sorted(node.children.items(), reverse=True):  # smallest token visited first
                stack.append((child, False))
        self._order = np.asarray(order, dtype=np.int64)
        return self._order

    def masked(self, admissible: np.ndarray) -> MaskedTrie:
        """A view of this trie holding only the items ``i`` with ``admissible[i]`` (bool, indexed by item
        index); O(count) to make, whatever the trie's size in nodes."""
        return MaskedTrie(self, admissible)

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


class MaskedTrie:
    """``TokenTrie`` restricted to admissible items (see ``TokenTrie.masked``); same ``allowed`` and
    ``lookup`` contract, as if the trie had been built from the admissible items alone."""

    def __init__(self, trie: TokenTrie, admissible: np.ndarray) -> None:
        ok = np.asarray(admissible)
        if ok.dtype != np.bool_ or ok.ndim != 1:
            raise ValueError("admissible must be a 1-D boolean mask indexed by item index")
        order = trie.build_index()
        if order.size and int(order.max()) >= ok.shape[0]:
            raise ValueError(f"admissible has {ok.shape[0]} entries; the trie has item index {int(order.max())}")
        self._trie = trie
        self._ok = ok.copy()
        self._cum = np.concatenate([[0], np.cumsum(self._ok[order], dtype=np.int64)])  # [count + 1]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self._cum[-1])

    def _admits(self, node: _Node) -> bool:
        return bool(self._cum[node.hi] > self._cum[node.lo])

    def allowed(self, prefix: Sequence[int] | np.ndarray) -> np.ndarray:
        """Tokens that continue an admissible item after ``prefix``, plus EOS if ``prefix`` spells one;
        EOS alone off the admissible trie (as ``TokenTrie.allowed``). int64 [k], sorted, read-only."""
        trie = self._trie
        node = trie._walk(prefix)
        if node is None or not self._admits(node):
            return trie._eos_only
        cached = self._cache.get(id(node))
        if cached is not None:
            return cached
        live = self._cum[node.child_hi] > self._cum[node.child_lo]
        ids = node.child_tokens[live]
        if node.item >= 0 and self._ok[node.item]:
            ids = np.sort(np.append(ids, trie.eos_token_id))
        ids.setflags(write=False)
        self._cache[id(node)] = ids
        return ids

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> int:
        """Index of the admissible item spelled by ``tokens`` (a trailing EOS is ignored), or -1."""
        index = self._trie.lookup(tokens)
        return index if index >= 0 and bool(self._ok[index]) else -1
