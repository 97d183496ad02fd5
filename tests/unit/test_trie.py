"""TokenTrie over multi-token ids and its masked views (semantic-ID items)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime.decoding.trie import TokenTrie

EOS = 0
WS = 3  # the answer prefix (a whitespace token)


def _prefixes(table: np.ndarray, head: tuple[int, ...]) -> set[tuple[int, ...]]:
    out = set()
    for row in table.tolist():
        seq = [*head, *row]
        out.update(tuple(seq[:n]) for n in range(len(seq) + 1))
    return out


def test_from_sequences_spells_each_row_after_the_prefix() -> None:
    table = np.array([[10, 20, 30, 40], [10, 20, 31, 41], [11, 22, 30, 40]])
    trie = TokenTrie.from_sequences(table, EOS, prefix=(WS,))
    assert len(trie) == 3 and trie.max_length == 5
    assert trie.allowed([]).tolist() == [WS]
    assert trie.allowed([WS]).tolist() == [10, 11]
    assert trie.allowed([WS, 10, 20]).tolist() == [30, 31]
    assert trie.allowed([WS, 10, 20, 31, 41]).tolist() == [EOS]
    assert trie.lookup([WS, 11, 22, 30, 40, EOS]) == 2
    assert trie.lookup([11, 22, 30, 40]) == -1  # without the prefix it is not a spelling
    assert trie.allowed([WS, 12]).tolist() == [EOS]  # off the trie: EOS alone


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_view_equals_the_trie_built_from_the_admissible_rows(seed: int) -> None:
    rng = np.random.default_rng(seed)
    rows = {tuple(int(v) for v in (rng.integers(10, 13), rng.integers(20, 23), rng.integers(30, 34), rng.integers(40, 42)))
            for _ in range(60)}
    table = np.array(sorted(rows, key=lambda _: rng.random()))  # unsorted rows: item index != lexicographic rank
    ok = rng.random(len(table)) < 0.4
    full = TokenTrie.from_sequences(table, EOS, prefix=(WS,))
    view = full.masked(ok)
    rebuilt = TokenTrie.from_sequences(table[ok], EOS, items=np.flatnonzero(ok), prefix=(WS,))
    assert len(view) == len(rebuilt) == int(ok.sum())
    for prefix in _prefixes(table, (WS,)):
        assert view.allowed(list(prefix)).tolist() == rebuilt.allowed(list(prefix)).tolist(), prefix
    for i, row in enumerate(table.tolist()):
        assert view.lookup([WS, *row, EOS]) == (i if ok[i] else -1)
        assert full.lookup([WS, *row]) == i


def test_masked_view_never_offers_a_branch_without_admissible_items() -> None:
    table = np.array([[10, 20], [10, 21], [11, 20]])
    view = TokenTrie.from_sequences(table, EOS).masked(np.array([False, True, False]))
    assert view.allowed([]).tolist() == [10]
    assert view.allowed([10]).tolist() == [21]
    assert view.allowed([11]).tolist() == [EOS]  # a branch with nothing admissible behaves as off the trie
    assert view.allowed([10, 21]).tolist() == [EOS]
    empty = TokenTrie.from_sequences(table, EOS).masked(np.zeros(3, bool))
    assert len(empty) == 0 and empty.allowed([]).tolist() == [EOS]


def test_masked_view_handles_items_that_prefix_other_items() -> None:
    trie = TokenTrie([[5], [5, 6], [5, 6, 7], [8]], EOS)
    for mask in itertools.product([False, True], repeat=4):
        ok = np.array(mask)
        view = trie.masked(ok)
        kept = [s for s, m in zip([[5], [5, 6], [5, 6, 7], [8]], mask) if m]
        for prefix in ([], [5], [5, 6], [5, 6, 7], [8]):
            expected = TokenTrie(kept, EOS, items=np.flatnonzero(ok)).allowed(prefix).tolist() if kept else [EOS]
            assert view.allowed(prefix).tolist() == expected, (mask, prefix)


def test_masked_view_rejects_a_mask_of_the_wrong_kind() -> None:
    trie = TokenTrie.from_sequences(np.array([[1, 2], [1, 3]]), EOS)
    with pytest.raises(ValueError, match="boolean"):
        trie.masked(np.array([1, 0]))
    with pytest.raises(ValueError, match="entries"):
        trie.masked(np.array([True]))
