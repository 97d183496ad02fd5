"""Semantic-ID tables: ``catalog/id2semantic.json`` of a checkpoint, and a seeded one for the demo.

A semantic id spells an item as 4 codes ``[a, b, c, d]`` (a, b, c in 0..511, d in 0..31), written in
prompts as the tokens ``item_a item_b item_c item_last_d``. Real tables come from a residual quantiser
of item embeddings, so that similar items share prefixes; the demo table imitates that shape: the first
code is shared by a category, the second by a few groups within it, so constrained beams really branch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from export.vocab import SEMANTIC_CODES, SEMANTIC_LAST_CODES

SEMANTIC_TABLE = "id2semantic.json"
"""File name of the table inside the checkpoint's ``catalog/`` directory."""
GROUPS_PER_CATEGORY = 4


def demo_semantic_ids(item_ids: Sequence[str], categories: Sequence[str], seed: int = 0) -> dict[str, list[int]]:
    """Random but collision-free semantic ids, one per item, with category-level shared prefixes."""
    if len(item_ids) != len(categories):
        raise ValueError("item_ids and categories must have the same length")
    rng = np.random.default_rng(seed + 7919)
    names = sorted(set(categories))
    if len(names) > SEMANTIC_CODES:
        raise ValueError(f"at most {SEMANTIC_CODES} categories fit the first code")
    first = rng.choice(SEMANTIC_CODES, size=len(names), replace=False)
    groups = {n: rng.choice(SEMANTIC_CODES, size=GROUPS_PER_CATEGORY, replace=False) for n in names}
    room = GROUPS_PER_CATEGORY * SEMANTIC_CODES * SEMANTIC_LAST_CODES
    if any(categories.count(n) > room // 2 for n in names):
        raise ValueError(f"at most {room // 2} items per category get demo semantic ids")
    code_of = {n: int(first[i]) for i, n in enumerate(names)}
    seen: set[tuple[int, ...]] = set()
    table: dict[str, list[int]] = {}
    for item_id, cat in zip(item_ids, categories):
        while True:
            code = (
                code_of[cat],
                int(groups[cat][int(rng.integers(0, GROUPS_PER_CATEGORY))]),
                int(rng.integers(0, SEMANTIC_CODES)),
                int(rng.integers(0, SEMANTIC_LAST_CODES)),
            )
            if code not in seen:
                break
        seen.add(code)
        table[item_id] = list(code)
    return table


def write_semantic_table(catalog_dir: Path, table: dict[str, list[int]]) -> Path:
    path = Path(catalog_dir) / SEMANTIC_TABLE
    path.write_text(json.dumps(table, indent=0) + "\n", encoding="utf-8")
    return path
