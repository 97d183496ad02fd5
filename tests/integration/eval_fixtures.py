"""Split files in the ``unimp eval`` data format, generated from an artifacts directory's catalog (seeded)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np

WORDS = ("great fit", "runs small", "lovely colour", "too pricey", "sturdy build", "soft fabric", "fast delivery")


def _item_ids(artifacts: Path) -> list[str]:
    with (artifacts / "catalog" / "items.jsonl").open() as handle:
        return [json.loads(line)["item_id"] for line in handle if line.strip()]


def _user(rng: random.Random, ids: list[str], uid: int) -> dict[str, object]:
    # a taste for a contiguous block of the catalog, so popularity has structure
    start = rng.randrange(len(ids) - 20)
    pool = ids[start : start + 20]
    picks = rng.sample(pool, 9)
    history = [{"item_id": i, "rating": rng.randint(1, 5), "explanation": f"{rng.choice(WORDS)} {rng.choice(WORDS)}"}
               for i in picks[:4]]
    candidates = picks[5:5 + rng.randint(3, 4)]
    selected = sorted(rng.sample(range(len(candidates)), rng.randint(1, 2)))
    return {"user_id": f"U{uid:05d}", "history": history, "next_item": picks[4], "query": "Shoes Running Shoe",
            "search_item": picks[4], "rating_item": picks[8], "rating": rng.randint(1, 5),
            "explanation": f"{rng.choice(WORDS)} and {rng.choice(WORDS)}", "candidates": candidates,
            "selected": selected}


def write_splits(artifacts: Path, directory: Path, users: tuple[int, int, int] = (40, 6, 6), seed: int = 0) -> Path:
    """``directory/{train,validation,test}.jsonl`` with the given user counts, from the catalog's item ids."""
    rng = random.Random(seed)
    ids = _item_ids(artifacts)
    directory.mkdir(parents=True, exist_ok=True)
    uid = 0
    for split, count in zip(("train", "validation", "test"), users):
        with (directory / f"{split}.jsonl").open("w") as handle:
            for _ in range(count):
                handle.write(json.dumps(_user(rng, ids, uid)) + "\n")
                uid += 1
    return directory


def copy_artifacts(src: Path, dst: Path) -> Path:
    """A copy of the artifacts without the caches derived from the graphs."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".ort-cache", ".cache", "checkpoint"))
    return dst


def perturb_decoder(artifacts: Path, scale: float = -1.0) -> str:
    """Scale the decoder's LM-head weight (the initializer shaped [hidden, vocab] or [vocab, hidden] that is
    not the input embedding) by ``scale`` and record the new sha256; returns the initializer's name.

    -1 reverses every ranking over the vocabulary, so a guard must notice it."""
    import onnx
    from onnx import numpy_helper

    from runtime.manifest import load_manifest, sha256_file

    manifest = load_manifest(artifacts, verify=False)
    path = artifacts / manifest.graphs["decoder"].file
    model = onnx.load(str(path))
    hidden, vocab = manifest.decoder.hidden_size, manifest.decoder.vocab_size
    target = None
    for init in model.graph.initializer:
        if sorted(init.dims) == sorted([hidden, vocab]) and "embed_in" not in init.name:
            target = init
            break
    if target is None:
        raise LookupError("no LM-head initializer in the decoder graph")
    array = numpy_helper.to_array(target) * np.float32(scale)
    target.CopyFrom(numpy_helper.from_array(array.astype(np.float32), target.name))
    onnx.save(model, str(path))
    graphs = dict(manifest.graphs)
    import dataclasses

    graphs["decoder"] = dataclasses.replace(graphs["decoder"], sha256=sha256_file(path))
    dataclasses.replace(manifest, graphs=graphs).save(artifacts)
    return target.name
