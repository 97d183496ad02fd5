"""Synthetic shoppers for the demo catalog: latent tastes, histories, queries, ratings, reviews, selections.

Every shopper has a latent taste: a primary and a secondary category, two favourite colours, a price band
and two favourite brands. Items are drawn with probability proportional to ``exp(SHARPNESS * affinity)``,
ratings are the taste match plus Gaussian noise (1..5), and the review sentence is templated from the
attributes that drove the rating (category, colour, price band, brand). Shoppers are split by user into
train / validation / test. Nothing is downloaded; the same seed gives the same files.

Data contract: ``CKPT/shop/{train,validation,test}.jsonl`` (copied to ``ART/shop/`` by export), one JSON
object per line, one line per user::

    {"user_id": "U00012",
     "history": [{"item_id": "P00003", "rating": 4, "explanation": "..."}, ...],
     "next_item": "P00042",
     "query": "Shoes Running Shoe", "search_item": "P00042",
     "rating_item": "P00017", "rating": 4, "explanation": "...",
     "candidates": ["P00100", "P00007", "P00033"], "selected": [1]}

- ``history``: oldest first, at least 4 items, ratings 1..5, explanations non-empty sentences.
- ``next_item``: the recommendation target, never in ``history``.
- ``query``: the search target's keywords (``{category} {noun}``); ``search_item``: the search target,
  not in ``history``.
- ``rating_item`` / ``rating`` / ``explanation``: the preference target (not in ``history``), its rating
  1..5 and review sentence.
- ``candidates``: 3 to 5 item ids, none in ``history``; ``selected``: the 1 or 2 suitable ones, as
  ascending indices into ``candidates``.

All target and candidate items are available in the catalog (the runtime never recommends unavailable items).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from export.catalog import CATEGORIES, COLORS, NOUNS, CatalogRecord

SPLITS = ("train", "validation", "test")
PRICE_BANDS = ("budget", "mid-range", "premium")
SHARPNESS = 3.0
"""Inverse temperature of item choice: higher makes shoppers more predictable."""
HISTORY_RANGE = (4, 8)
"""Inclusive bounds of a shopper's history length."""


def price_band(price: str) -> str:
    value = float(price)
    return PRICE_BANDS[0] if value < 60 else PRICE_BANDS[1] if value < 150 else PRICE_BANDS[2]


@dataclass(frozen=True)
class ItemAttributes:
    """The attributes an item's title and metadata spell out."""

    item_id: str
    category: str
    brand: str
    color: str
    noun: str
    band: str
    available: bool


def item_attributes(record: CatalogRecord) -> ItemAttributes:
    """Recover colour and noun from the title ``{brand} {adjective} {colour} {noun}``."""
    noun = next(n for n in NOUNS[record.category] if record.title.endswith(" " + n))
    color = next(c for c in COLORS if f" {c} {noun}" in record.title)
    return ItemAttributes(record.item_id, record.category, record.brand, color, noun, price_band(record.price),
                          record.available)


def keywords(item: ItemAttributes) -> str:
    """The search query for an item: its category path and noun, as the paper's keyword queries."""
    return f"{item.category} {item.noun}"


@dataclass(frozen=True)
class Taste:
    categories: tuple[str, str]
    """Primary, secondary."""
    colors: tuple[str, str]
    band: str
    brands: tuple[str, str]

    def drivers(self, item: ItemAttributes) -> list[tuple[str, float]]:
        """(attribute, contribution) pairs of the affinity, in a fixed order."""
        cat = 1.0 if item.category == self.categories[0] else 0.6 if item.category == self.categories[1] else -0.6
        return [
            ("category", cat),
            ("color", 0.5 if item.color in self.colors else -0.3),
            ("band", 0.3 if item.band == self.band else -0.2),
            ("brand", 0.3 if item.brand in self.brands else 0.0),
        ]

    def affinity(self, item: ItemAttributes) -> float:
        """From -1.1 (nothing matches) to 2.1 (primary category, favourite colour, band and brand)."""
        return sum(v for _, v in self.drivers(item))


_GOOD = {
    "category": "I always come back to {category_lower} like this {noun_lower}.",
    "color": "The {color_lower} colour is exactly what I wanted.",
    "band": "Fair price for a {band} {noun_lower}.",
    "brand": "{brand} never disappoints.",
}
_BAD = {
    "category": "Not really my kind of {noun_lower}.",
    "color": "I do not like the {color_lower} colour.",
    "band": "Too {band_other} for what it is.",
    "brand": "",
}


def explanation(taste: Taste, item: ItemAttributes, rating: int) -> str:
    """One sentence from the attribute that drove the rating most (the strongest positive one for 4-5,
    the strongest negative one for 1-2, and for 3 a positive one joined with a negative one)."""
    drivers = taste.drivers(item)
    fields = {
        "category_lower": item.category.lower(), "noun_lower": item.noun.lower(), "color_lower": item.color.lower(),
        "band": item.band, "brand": item.brand,
        "band_other": "pricey" if PRICE_BANDS.index(item.band) > PRICE_BANDS.index(taste.band) else "cheap-looking",
    }
    good = [k for k, v in sorted(drivers, key=lambda d: -d[1]) if v > 0]
    bad = [k for k, v in sorted(drivers, key=lambda d: d[1]) if v < 0 and _BAD[k]]
    if rating >= 4:
        parts = [_GOOD[k] for k in good[:1]] or ["Does the job."]
    elif rating <= 2:
        parts = [_BAD[k] for k in bad[:1]] or ["Not for me."]
    else:
        parts = [_GOOD[good[0]].rstrip(".")] if good else []
        worse = _BAD[bad[0]] if bad else ""
        parts += [worse if worse.startswith("I ") else worse[:1].lower() + worse[1:]] if bad else []
        parts = [", but ".join(parts).rstrip(".") + "."] if parts else ["It is okay."]
    return " ".join(p.format(**fields) for p in parts)


def rate(taste: Taste, item: ItemAttributes, rng: np.random.Generator) -> int:
    """Taste match plus noise: affinity -1.1..2.1 maps linearly to 1..5, plus N(0, 0.35), rounded."""
    value = 1.0 + 4.0 * (taste.affinity(item) + 1.1) / 3.2 + float(rng.normal(0.0, 0.35))
    return int(np.clip(np.rint(value), 1, 5))


def review_corpus() -> list[str]:
    """Every sentence the review templates can produce, with placeholders filled generically (tokenizer
    training corpus)."""
    lines = []
    for cat, nouns in NOUNS.items():
        for noun in nouns:
            for color in COLORS:
                fields = {"category_lower": cat.lower(), "noun_lower": noun.lower(), "color_lower": color.lower(),
                          "band": PRICE_BANDS[len(noun) % 3], "brand": CATEGORIES[cat][0], "band_other": "pricey"}
                lines.append(" ".join(t.format(**fields) for t in list(_GOOD.values()) + list(_BAD.values()) if t))
    return lines


@dataclass
class Shopper:
    user_id: str
    taste: Taste
    history: list[dict[str, Any]] = field(default_factory=list)
    next_item: str = ""
    query: str = ""
    search_item: str = ""
    rating_item: str = ""
    rating: int = 0
    explanation: str = ""
    candidates: list[str] = field(default_factory=list)
    selected: list[int] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """The contract's JSON object (the latent taste is not part of it)."""
        out = asdict(self)
        del out["taste"]
        return out


def _draw_taste(rng: np.random.Generator) -> Taste:
    cats = rng.choice(list(CATEGORIES), size=2, replace=False)
    colors = rng.choice(list(COLORS), size=2, replace=False)
    brands = tuple(str(rng.choice(CATEGORIES[str(c)])) for c in cats)
    return Taste((str(cats[0]), str(cats[1])), (str(colors[0]), str(colors[1])),
                 str(rng.choice(PRICE_BANDS)), (brands[0], brands[1]))


def _choose(rng: np.random.Generator, weights: np.ndarray, allowed: np.ndarray) -> int:
    w = np.where(allowed, weights, 0.0)
    return int(rng.choice(len(w), p=w / w.sum()))


def make_shopper(user_id: str, items: list[ItemAttributes], rng: np.random.Generator) -> Shopper:
    """One shopper: a taste, then history (85% taste-driven, 15% exploration), targets and a selection set."""
    taste = _draw_taste(rng)
    affinity = np.array([taste.affinity(i) for i in items])
    weights = np.exp(SHARPNESS * affinity)
    available = np.array([i.available for i in items])
    free = available.copy()
    shopper = Shopper(user_id, taste)
    for _ in range(int(rng.integers(HISTORY_RANGE[0], HISTORY_RANGE[1] + 1))):
        k = _choose(rng, weights if rng.random() < 0.85 else np.ones_like(weights), free)
        free[k] = False
        r = rate(taste, items[k], rng)
        shopper.history.append({"item_id": items[k].item_id, "rating": r, "explanation": explanation(taste, items[k], r)})
    nxt = _choose(rng, weights, free)
    shopper.next_item = items[nxt].item_id
    search = _choose(rng, weights, free)
    shopper.search_item, shopper.query = items[search].item_id, keywords(items[search])
    # preference targets: half as the shopper would pick, half uniform, so ratings spread over 1..5
    target = _choose(rng, weights if rng.random() < 0.5 else np.ones_like(weights), free)
    shopper.rating_item = items[target].item_id
    shopper.rating = rate(taste, items[target], rng)
    shopper.explanation = explanation(taste, items[target], shopper.rating)
    n_candidates = int(rng.integers(3, 6))
    n_good = int(rng.integers(1, 3))
    good_pool = free & (affinity >= 1.5)
    bad_pool = free & (affinity <= 0.0)
    if good_pool.sum() < n_good or bad_pool.sum() < n_candidates - n_good:
        good_pool, bad_pool = free & (affinity >= np.quantile(affinity, 0.8)), free & (affinity <= np.median(affinity))
    good = list(rng.choice(np.flatnonzero(good_pool), size=n_good, replace=False))
    bad = list(rng.choice(np.flatnonzero(bad_pool & ~np.isin(np.arange(len(items)), good)),
                          size=n_candidates - n_good, replace=False))
    order = rng.permutation(n_candidates)
    chosen = [int(k) for k in good + bad]
    shopper.candidates = [items[chosen[j]].item_id for j in order]
    shopper.selected = sorted(int(np.flatnonzero(order == g)[0]) for g in range(n_good))
    return shopper


def build_shop(
    directory: Path, records: list[CatalogRecord], num_users: int, seed: int = 0,
    fractions: tuple[float, float] = (0.8, 0.1),
) -> dict[str, list[Shopper]]:
    """Write ``{train,validation,test}.jsonl`` under ``directory``; users split by id (train / validation /
    test fractions ``fractions[0]``, ``fractions[1]``, the rest)."""
    rng = np.random.default_rng([seed, 11])
    items = [item_attributes(r) for r in records]
    shoppers = [make_shopper(f"U{u:05d}", items, rng) for u in range(num_users)]
    order = rng.permutation(num_users)
    n_train, n_val = int(num_users * fractions[0]), int(num_users * fractions[1])
    parts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[Shopper]] = {}
    for split, idx in parts.items():
        out[split] = [shoppers[i] for i in sorted(idx)]
        with open(directory / f"{split}.jsonl", "w", encoding="utf-8") as handle:
            for s in out[split]:
                handle.write(json.dumps(s.record()) + "\n")
    return out


def read_split(directory: Path, split: str) -> list[dict[str, Any]]:
    """The records of one split file (``directory/{split}.jsonl``)."""
    with open(Path(directory) / f"{split}.jsonl", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
