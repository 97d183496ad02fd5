"""Synthetic retail catalog for the demo checkpoints: Amazon-style metadata and generated product images."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CATEGORIES = {
    "Clothing": ["Nordwind", "Lumen Wear", "Cotton Trail", "Urban Thread"],
    "Shoes": ["Stridewell", "Pacefield", "Kestrel", "Oakstep"],
    "Beauty": ["Glowen", "Petal & Co", "Aurora Skin", "Velvetine"],
    "Electronics": ["Voltix", "Nimbus Audio", "Cirrus", "Helio"],
    "Home & Kitchen": ["Hearthly", "Copperleaf", "Maison Sol", "Brightnest"],
    "Toys": ["Playvale", "Tinker Owl", "Blockbay", "Jolly Fox"],
    "Sports": ["Summit Gear", "Tideline", "Forge Fit", "Ridgeback"],
    "Books": ["Quillhouse", "Lantern Press", "Inkwell", "Bramble Books"],
}
NOUNS = {
    "Clothing": ["T-Shirt", "Hoodie", "Denim Jacket", "Wool Sweater", "Linen Shirt", "Rain Coat"],
    "Shoes": ["Running Shoe", "Leather Boot", "Canvas Sneaker", "Sandal", "Trail Runner", "Loafer"],
    "Beauty": ["Face Serum", "Lip Balm", "Night Cream", "Shampoo", "Body Lotion", "Eye Palette"],
    "Electronics": ["Wireless Earbuds", "Bluetooth Speaker", "Phone Charger", "Smart Watch", "Headphones", "USB Hub"],
    "Home & Kitchen": ["Coffee Mug", "Chef Knife", "Throw Pillow", "Table Lamp", "Cutting Board", "Tea Kettle"],
    "Toys": ["Puzzle", "Plush Bear", "Building Set", "Toy Car", "Board Game", "Kite"],
    "Sports": ["Yoga Mat", "Water Bottle", "Tennis Racket", "Dumbbell Set", "Bike Helmet", "Jump Rope"],
    "Books": ["Cookbook", "Mystery Novel", "Travel Guide", "Poetry Collection", "Sci-Fi Novel", "Biography"],
}
ADJECTIVES = ["Classic", "Organic", "Lightweight", "Premium", "Compact", "Vintage", "Eco", "Deluxe", "Soft", "Bold"]
COLORS = {
    "Red": (200, 40, 40),
    "Blue": (40, 70, 200),
    "Green": (40, 160, 70),
    "Black": (30, 30, 30),
    "White": (235, 235, 235),
    "Yellow": (230, 200, 40),
    "Purple": (130, 60, 170),
    "Orange": (240, 130, 30),
}
SHAPES = {cat: i for i, cat in enumerate(CATEGORIES)}


@dataclass(frozen=True)
class CatalogRecord:
    """One line of ``catalog/items.jsonl``."""

    item_id: str
    token: int
    category: str
    price: str
    brand: str
    title: str
    image: str
    available: bool = True


def _draw_product(category: str, color: tuple[int, int, int], rng: np.random.Generator, size: int) -> Image.Image:
    """A flat product shot: one silhouette per category, filled with the item's colour, on a pale background.

    The category decides the shape (8 distinct silhouettes) and the colour fills most of the frame, so a
    small vision tower can read both; seeded jitter (position, size, background tint, one accent ring)
    keeps images of the same kind from being identical.
    """
    bg = tuple(int(c) for c in rng.integers(215, 256, size=3))
    img = Image.new("RGB", (size, size), bg)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(img)
    m = size // 8 + int(rng.integers(0, size // 12 + 1))
    lo, hi, mid = m, size - m, size // 2
    shape = SHAPES[category] % 8
    if shape == 0:  # square
        draw.rectangle((lo, lo, hi, hi), fill=color)
    elif shape == 1:  # disc
        draw.ellipse((lo, lo, hi, hi), fill=color)
    elif shape == 2:  # triangle
        draw.polygon([(mid, lo), (hi, hi), (lo, hi)], fill=color)
    elif shape == 3:  # wide bar
        draw.rectangle((lo, mid - size // 6, hi, mid + size // 6), fill=color)
    elif shape == 4:  # diamond
        draw.polygon([(mid, lo), (hi, mid), (mid, hi), (lo, mid)], fill=color)
    elif shape == 5:  # ring
        draw.ellipse((lo, lo, hi, hi), outline=color, width=max(2, size // 7))
    elif shape == 6:  # cross
        w = size // 7
        draw.rectangle((mid - w, lo, mid + w, hi), fill=color)
        draw.rectangle((lo, mid - w, hi, mid + w), fill=color)
    else:  # tall bar
        draw.rectangle((mid - size // 6, lo, mid + size // 6, hi), fill=color)
    x, y = (int(v) for v in rng.integers(0, size, size=2))
    r = int(rng.integers(2, size // 10))
    accent = tuple(int(c) for c in rng.integers(0, 256, size=3))
    draw.ellipse((x - r, y - r, x + r, y + r), outline=accent, width=1)  # type: ignore[arg-type]
    return img


def build_catalog(directory: Path, num_items: int, seed: int = 0, image_size: int = 96) -> list[CatalogRecord]:
    """Write ``items.jsonl`` and ``images/*.png`` under ``directory``; item k maps to token ``item_k``."""
    rng = np.random.default_rng(seed)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    categories = list(CATEGORIES)
    records = []
    for k in range(num_items):
        cat = categories[k % len(categories)]
        brand = CATEGORIES[cat][int(rng.integers(0, len(CATEGORIES[cat])))]
        color = list(COLORS)[int(rng.integers(0, len(COLORS)))]
        noun = NOUNS[cat][int(rng.integers(0, len(NOUNS[cat])))]
        adjective = ADJECTIVES[int(rng.integers(0, len(ADJECTIVES)))]
        title = f"{brand} {adjective} {color} {noun}"
        price = f"{float(rng.uniform(3, 250)):.2f}"
        item_id = f"P{k:05d}"
        rel = f"images/{item_id}.png"
        available = bool(rng.random() > 0.03)
        image_rng = np.random.default_rng([seed, k])  # per item: drawing never shifts later items' attributes
        _draw_product(cat, COLORS[color], image_rng, image_size).save(directory / rel, optimize=False)
        records.append(CatalogRecord(item_id, k, cat, price, brand, title, rel, available=available))
    with open(directory / "items.jsonl", "w", encoding="utf-8") as handle:
        for rec in records:
            handle.write(json.dumps(asdict(rec)) + "\n")
    return records


def catalog_corpus(records: list[CatalogRecord]) -> list[str]:
    """Text to train the demo tokenizer on: metadata plus the prompt templates' words."""
    lines = [f"Category {r.category} Price {r.price} Brand {r.brand} Title {r.title}" for r in records]
    lines += [
        "What is the next item recommended to the user?",
        "Query: What is the related item ID to the query based on the history?",
        "What is the rating and explanation for the item?",
        "User history: Select from: Selection Can you select the suitable item from above for the user?",
        "What is the generated Image ID to the query based on the history? Unknown",
        "I love this product, great quality and fits well. Not what I expected, it broke after a week.",
        "The colour is lovely and the price is fair. Comfortable, stylish and easy to clean. 0123456789",
    ]
    return lines
