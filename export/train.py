"""Train the demo UniMP on the synthetic shop (CPU, PyTorch), with the paper's recipe where it applies.

- Every task's prompt is built by ``runtime.prompts`` (so training and serving prompts are the same bytes),
  followed by the answer span: `` item_{k}`` (recommendation, search), ``rate_{r} {explanation}``
  (preference), ``s_i [s_j]`` (selection), then EOS.
- The loss covers every answer span, the history's too (context reconstruction): the ``item_k`` token of
  each recommendation/search history chunk and the ``rate_r explanation`` of each preference history chunk.
- Tokens are weighted focal-style, ``(1 - p)^gamma`` with gamma 2, and each task has a loss weight.
- The runtime's fast paths read the answer straight from the ``<answer>`` position's logits (item-slice
  top-k, the rating distribution, the selection distribution), while the paper's answer starts with a
  space token; an auxiliary loss on that position's restricted softmax (items, ``rate_1..5`` or the
  candidates' ``s_i``) teaches both. Half the preference examples drop the leading space so that
  ``Explain`` (which feeds ``rate_r`` right after ``<answer>``) continues from a context it has seen.
- Selection: the paper's candidate chunk names its tag before its metadata (``Selection s_k {meta}``), so a
  causal model has to tie the suitable chunk's content back to the tag at its start. Every selection
  example shows its candidates in a fresh order, and a candidate-tag loss makes each token of candidate
  ``k``'s chunk after ``s_k`` predict ``s_k`` among the prompt's tags (``TrainConfig.tag_weight``); without
  it the tiny model answers one slot for every user.
- The language model, the gated cross-attention and the embeddings are trained; the vision tower and the
  perceiver keep their seeded weights unless ``TrainConfig.train_vision``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from export.catalog import CatalogRecord
from export.modeling.config import CLIP_MEAN, CLIP_STD
from export.modeling.model import UniMP
from export.resume import ResumeOptions
from export.shop import item_attributes, keywords
from export.vocab import AddedVocab
from runtime.prompts import (
    DEFAULT_MAX_HISTORY,
    Prompt,
    ResolvedItem,
    preference_prompt,
    recommendation_prompt,
    search_prompt,
    selection_prompt,
)
from runtime.types import ItemMeta

log = logging.getLogger(__name__)

TASKS = ("recommend", "search", "preference", "selection")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    gamma: float = 2.0
    """Focal exponent: each token's loss is scaled by (1 - p)^gamma."""
    task_mix: tuple[float, float, float, float] = (0.45, 0.25, 0.15, 0.15)
    """Sampling probabilities of recommend, search, preference, selection examples."""
    task_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    """Loss weight per task (same order)."""
    slice_weight: float = 1.0
    """Weight of the restricted-softmax loss at the ``<answer>`` position."""
    tag_weight: float = 1.0
    """Weight of the candidate-tag loss of selection prompts: every token of candidate ``k``'s chunk after its
    ``s_k`` predicts ``s_k`` among the prompt's tags (see ``Example.tag_pos``)."""
    max_history: int = DEFAULT_MAX_HISTORY
    train_vision: bool = False
    """Also train the vision tower and the perceiver (slow on CPU). Off: both keep their seeded weights,
    as the paper keeps CLIP frozen, and the catalog's media latents are computed once."""
    seed: int = 0
    threads: int = 0
    """torch threads (0: keep torch's default)."""


PRESETS = {
    "tiny": TrainConfig(steps=300, batch_size=16, lr=3e-3, tag_weight=3.0),
    "small": TrainConfig(steps=300, batch_size=8, lr=5e-4, warmup=30),
}
"""Training recipe per demo preset (``tiny``: 300 steps, 318 s measured on 2 busy cores; 200 steps lose the
acceptance margins, and tag weight 3 measured better than 1 on every task but search: README "Evaluation")."""


SAVE_EVERY = {"tiny": 0, "small": 10}
"""Default ``--save-every`` per demo preset: ``small`` saves every 10 steps (2-6 minutes of training on 2
cores); ``tiny`` (5 minutes in all) only when stopped and at the end."""


def train_preset(preset: str, steps: int | None = None) -> TrainConfig:
    """The preset's recipe, with ``steps`` optimizer steps when given (the warmup shrinks to at most a
    tenth of them; the cosine decay spans the rest)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cfg = PRESETS[preset]
    if steps is None:
        return cfg
    if steps < 1:
        raise ValueError(f"--train-steps: must be >= 1, got {steps}")
    return replace(cfg, steps=steps, warmup=min(cfg.warmup, max(1, steps // 10)))


@dataclass
class Example:
    """One training sequence: token ids, a loss weight per position, images in prompt order."""

    task: str
    ids: list[int]
    weights: list[float]
    """weights[j] scales the loss of predicting ids[j] from the tokens before it (0 = unsupervised)."""
    images: list[int]
    """Catalog indices of the prompt's images, one per ``<image>`` token, in order."""
    slice_pos: int
    """Position whose logits the runtime reads (the last prompt token)."""
    slice_ids: list[int]
    slice_target: list[float]
    """Target distribution over ``slice_ids`` (sums to 1)."""
    tag_pos: list[int] = field(default_factory=list)
    """Selection prompts: the positions of each candidate chunk after its ``s_k`` tag (through its
    ``<|endofchunk|>``); empty for the other tasks."""
    tag_target: list[int] = field(default_factory=list)
    """The candidate index ``k`` of each ``tag_pos`` (an index into ``slice_ids``)."""


@dataclass
class TrainResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    losses: list[float] = field(default_factory=list)


class ShopExamples:
    """Builds training examples from shop records, with the served prompt builders."""

    def __init__(self, records: list[CatalogRecord], tokenizer: Tokenizer, vocab: AddedVocab,
                 max_history: int = DEFAULT_MAX_HISTORY) -> None:
        self.records = records
        self.index = {r.item_id: k for k, r in enumerate(records)}
        self.attrs = [item_attributes(r) for r in records]
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.max_history = max_history
        self.space = tokenizer.encode(" ", add_special_tokens=False).ids

    def resolved(self, item_id: str, rating: int = 0, explanation: str = "") -> ResolvedItem:
        """A catalog item as the runtime resolves it (metadata from the catalog, catalog image)."""
        r = self.records[self.index[item_id]]
        return ResolvedItem(ItemMeta(category=r.category, price=r.price, brand=r.brand, title=r.title),
                            item_id=r.item_id, token=r.token, rating=rating, explanation=explanation)

    def _history(self, entries: Sequence[dict[str, Any]]) -> tuple[ResolvedItem, ...]:
        return tuple(self.resolved(h["item_id"], h["rating"], h["explanation"]) for h in entries)

    # -- prompts (the served ones) ----------------------------------------------------------------------
    def prompt(self, task: str, user: dict[str, Any]) -> tuple[Prompt, str]:
        """The served prompt and the reference answer for one contract record's target of ``task``."""
        history = self._history(user["history"])
        n = self.max_history
        if task == "recommend":
            return recommendation_prompt(history, n), f" item_{self.resolved(user['next_item']).token}"
        if task == "search":
            return search_prompt(history, user["query"], n), f" item_{self.resolved(user['search_item']).token}"
        if task == "preference":
            target = self.resolved(user["rating_item"])
            return preference_prompt(history, target, n), f" rate_{user['rating']} {user['explanation']}"
        if task == "selection":
            cands = tuple(self.resolved(c) for c in user["candidates"])
            return selection_prompt(history, cands, n), " ".join(f"s_{i}" for i in user["selected"])
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")

    def augmented(self, task: str, user: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        """A record whose target is a random later interaction of the user (more examples per user)."""
        seq = [*user["history"], {"item_id": user["next_item"], "rating": 0, "explanation": ""}]
        if task == "recommend":
            t = int(rng.integers(1, len(seq)))
            return {**user, "history": seq[:t], "next_item": seq[t]["item_id"]}
        if task == "search":
            t = int(rng.integers(1, len(seq)))
            return {**user, "history": seq[:t], "search_item": seq[t]["item_id"],
                    "query": keywords(self.attrs[self.index[seq[t]["item_id"]]])}
        if task == "preference":
            hist = user["history"]
            t = int(rng.integers(1, len(hist)))
            return {**user, "history": hist[:t], "rating_item": hist[t]["item_id"], "rating": hist[t]["rating"],
                    "explanation": hist[t]["explanation"]}
        if task == "selection":  # the same set in another order: the answer is the content, not the slot
            order = [int(i) for i in rng.permutation(len(user["candidates"]))]
            return {**user, "candidates": [user["candidates"][i] for i in order],
                    "selected": sorted(order.index(i) for i in user["selected"])}
        return user

    # -- tokens and weights -----------------------------------------------------------------------------
    def example(self, task: str, user: dict[str, Any], weight: float = 1.0, drop_space: bool = False) -> Example:
        prompt, answer = self.prompt(task, user)
        v = self.vocab
        ids = [int(i) for i in self.tokenizer.encode(prompt.text, add_special_tokens=False).ids]
        answer_ids = [int(i) for i in self.tokenizer.encode(answer, add_special_tokens=False).ids]
        if drop_space and answer_ids[: len(self.space)] == self.space:
            answer_ids = answer_ids[len(self.space):]
        weights = [0.0] * len(ids)
        items = range(v.item_start, v.item_start + v.item_count)
        if task in ("recommend", "search"):
            for j, tok in enumerate(ids):  # history chunks: `{meta} item_k <|endofchunk|>`
                if tok in items:
                    weights[j] = weight
        elif task == "preference":
            inside = False
            for j, tok in enumerate(ids[:-1]):  # history answers: `<answer> rate_r {explanation} <|endofchunk|>`
                if tok == v.answer:
                    inside = True
                elif tok == v.endofchunk:
                    inside = False
                elif inside:
                    weights[j] = weight
        slice_pos = len(ids) - 1
        if task in ("recommend", "search"):
            slice_ids = list(items)
            target = [0.0] * v.item_count
            target[answer_ids[-1] - v.item_start] = 1.0
        elif task == "preference":
            slice_ids = list(v.rates)
            target = [0.0] * 5
            target[int(user["rating"]) - 1] = 1.0
        else:
            n = len(user["candidates"])
            slice_ids = list(v.selections[:n])
            target = [1.0 / len(user["selected"]) if i in user["selected"] else 0.0 for i in range(n)]
        tag_pos: list[int] = []
        tag_target: list[int] = []
        if task == "selection":  # `<image> Selection s_k {meta} <|endofchunk|>`: the chunk's tokens after s_k
            tags = {tok: k for k, tok in enumerate(slice_ids)}
            current = -1
            for j, tok in enumerate(ids):
                if tok in tags:
                    current = tags[tok]
                elif current >= 0:
                    tag_pos.append(j)
                    tag_target.append(current)
                    if tok == v.endofchunk:
                        current = -1
        all_ids = ids + answer_ids + [v.eos]
        weights += [weight] * (len(answer_ids) + 1)
        images = [self.index[i.item_id] for i in prompt.images]
        return Example(task, all_ids, weights, images, slice_pos, slice_ids, target, tag_pos, tag_target)

    def sample(self, users: list[dict[str, Any]], rng: np.random.Generator, cfg: TrainConfig,
               task_index: int | None = None) -> Example:
        """A random example of task ``task_index`` (drawn from ``cfg.task_mix`` when None)."""
        if task_index is None:
            task_index = int(rng.choice(len(TASKS), p=np.asarray(cfg.task_mix) / sum(cfg.task_mix)))
        task = TASKS[task_index]
        user = users[int(rng.integers(0, len(users)))]
        if task == "selection" or rng.random() < 0.5:  # selection: always in a fresh order
            user = self.augmented(task, user, rng)
        drop = task == "preference" and bool(rng.random() < 0.5)
        return self.example(task, user, cfg.task_weights[task_index], drop_space=drop)


def catalog_pixels(directory: Path, records: list[CatalogRecord], image_size: int) -> torch.Tensor:
    """(N, 3, S, S) catalog images preprocessed exactly as the runtime does (``runtime.vision.preprocess``)."""
    from runtime.vision import preprocess

    data = [(directory / r.image).read_bytes() for r in records]
    return torch.from_numpy(preprocess(data, image_size, CLIP_MEAN, CLIP_STD))


def _pad(batch: list[Example], vocab: AddedVocab) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and loss weights, each (B, T)."""
    length = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), length), vocab.pad, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    weights = torch.zeros((len(batch), length))
    for b, e in enumerate(batch):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.ids)] = 1
        weights[b, : len(e.ids)] = torch.tensor(e.weights)
    return ids, mask, weights


def _hidden(model: UniMP, batch: list[Example], ids: torch.Tensor, mask: torch.Tensor, vocab: AddedVocab,
            pixels: torch.Tensor | None, media: torch.Tensor | None) -> torch.Tensor:
    """Final hidden states (B, T, D) of right-padded rows: the reference forward, as ``full_logits``."""
    unique = sorted({k for e in batch for k in e.images})
    where = {k: i for i, k in enumerate(unique)}
    if media is not None:
        encoded = media[unique]
    elif pixels is not None and unique:
        encoded = model.encode_images(pixels[unique])
    else:
        encoded = torch.zeros(0)
    latents = [encoded[[where[k] for k in e.images]] if e.images else
               torch.zeros(0, model.num_latents, model.cfg.vision.width) for e in batch]
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    text_time = (ids == vocab.image).long().cumsum(-1)
    hidden, _ = model.lm(ids, position_ids, mask, text_time, model.empty_past(len(batch)), model.sequence_memory(latents))
    return hidden


def answer_logits(model: UniMP, batch: list[Example], vocab: AddedVocab, pixels: torch.Tensor | None = None,
                  media: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits at each example's last prompt token: what the runtime's prefill returns."""
    ids, mask, _ = _pad(batch, vocab)
    hidden = _hidden(model, batch, ids, mask, vocab, pixels, media)
    return model.lm.logits(hidden[torch.arange(len(batch)), torch.tensor([e.slice_pos for e in batch])])


def batch_loss(model: UniMP, batch: list[Example], pixels: torch.Tensor | None, vocab: AddedVocab, gamma: float,
               slice_weight: float, media: torch.Tensor | None = None, tag_weight: float = 0.0) -> torch.Tensor:
    """Focal-weighted token loss over the supervised positions plus the restricted-softmax loss at the
    answer position, plus ``tag_weight`` times the candidate-tag loss of selection examples (each
    candidate chunk's tokens predict the chunk's ``s_k`` among the prompt's tags). ``pixels`` (N, 3, S, S)
    are encoded for the batch's images, or ``media`` (N, n, Dv) gives the catalog's media latents directly
    (frozen vision)."""
    ids, mask, weights = _pad(batch, vocab)
    hidden = _hidden(model, batch, ids, mask, vocab, pixels, media)
    rows, cols = torch.nonzero(weights[:, 1:] > 0, as_tuple=True)  # predict ids[:, c + 1] at position c
    logp = F.log_softmax(model.lm.logits(hidden[rows, cols]), dim=-1)  # (K, V)
    tok_logp = logp.gather(-1, ids[rows, cols + 1][:, None])[:, 0]  # (K,)
    focal = (1.0 - tok_logp.exp()).clamp(min=0.0) ** gamma
    w = weights[rows, cols + 1]
    token_loss = -(focal * tok_logp * w).sum() / w.sum().clamp(min=1e-6)
    at_answer = model.lm.logits(hidden[torch.arange(len(batch)), torch.tensor([e.slice_pos for e in batch])])  # (B, V)
    slice_terms = []
    for b, e in enumerate(batch):
        row = F.log_softmax(at_answer[b, e.slice_ids], dim=-1)
        slice_terms.append(-(torch.tensor(e.slice_target) * row).sum() * max(e.weights[-1], 0.0))
    loss = token_loss + slice_weight * torch.stack(slice_terms).mean()
    tagged = [b for b, e in enumerate(batch) if e.tag_pos]
    if tag_weight > 0 and tagged:
        tag_terms = []
        for b in tagged:
            e = batch[b]
            logp = F.log_softmax(model.lm.logits(hidden[b, e.tag_pos])[:, e.slice_ids], dim=-1)  # (P, n)
            tag_terms.append(-logp.gather(-1, torch.tensor(e.tag_target)[:, None]).mean() * max(e.weights[-1], 0.0))
        loss = loss + tag_weight * torch.stack(tag_terms).sum() / len(batch)
    return loss


def init_item_embeddings(model: UniMP, examples: ShopExamples) -> None:
    """Start each ``item_k`` row (input embedding and LM head) at the mean row of its metadata's tokens, so
    items that share a category, brand, colour or noun start out alike (a common way to add new tokens)."""
    v = examples.vocab
    embed_in, embed_out = model.lm.gpt_neox.embed_in.weight, model.lm.embed_out.weight
    with torch.no_grad():
        for r in examples.records:
            ids = examples.tokenizer.encode(f"{r.category} {r.brand} {r.title}", add_special_tokens=False).ids
            ids = [i for i in ids if i < v.endofchunk]  # base vocabulary only
            if ids:
                embed_in[v.item_start + r.token] = embed_in[ids].mean(0)
                embed_out[v.item_start + r.token] = embed_out[ids].mean(0)


def _setup(model: UniMP, examples: ShopExamples, users: list[dict[str, Any]], cfg: TrainConfig,
           media_key: str) -> dict[str, Any]:
    """What a saved training state must match to be resumed: the recipe, the model config, the data and
    tokenizer, the training code (export/train.py, export/modeling/) and the catalog-encode key (the thread
    count is not part of it)."""
    import hashlib
    from dataclasses import asdict

    data = hashlib.sha256(json.dumps([users, [asdict(r) for r in examples.records]], sort_keys=True).encode())
    data.update(examples.tokenizer.to_str().encode())
    code = hashlib.sha256()  # the training arithmetic: this module and the model's
    for path in [Path(__file__), *sorted((Path(__file__).parent / "modeling").glob("*.py"))]:
        code.update(path.name.encode() + path.read_bytes())
    train_cfg = {k: v for k, v in asdict(cfg).items() if k != "threads"}
    return {"train": json.loads(json.dumps(train_cfg)), "model": json.loads(json.dumps(model.cfg.to_dict())),
            "data_sha256": data.hexdigest()[:20], "code_sha256": code.hexdigest()[:20], "media_key": media_key}


def train(
    model: UniMP,
    examples: ShopExamples,
    users: list[dict[str, Any]],
    pixels: torch.Tensor,
    cfg: TrainConfig,
    progress: bool = True,
    resume: ResumeOptions | None = None,
) -> TrainResult:
    """AdamW with linear warmup and cosine decay; returns the loss curve (per step).

    ``resume``: cache the catalog encode and save the training state under ``resume.directory``
    (``export.resume``), continue from a saved state, and stop early (``TrainingStopped``, state saved)
    on the deadline, SIGINT/SIGTERM or ``resume.stop_after``."""
    from export.resume import StopWatch, TrainingStopped, cached_media, load_state, media_key, save_state

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 7])
    init_item_embeddings(model, examples)
    model.train()
    frozen = [(n, p) for n, p in model.named_parameters() if n.startswith(("vision.", "perceiver."))]
    key = "trained-vision" if cfg.train_vision else media_key(frozen, pixels)
    setup = _setup(model, examples, users, cfg, key)
    state_dir = resume.directory if resume is not None else None
    if resume is not None and resume.restart:
        from export.resume import discard_state

        discard_state(resume.directory)
    loading = time.perf_counter()
    saved = load_state(resume.directory, setup) if resume is not None else None
    if not cfg.train_vision:
        for _, p in frozen:
            p.requires_grad_(False)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": other, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))

    def schedule(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    losses: list[float] = []
    start, seconds_before = 0, 0.0
    if saved is not None:
        record, tensors = saved
        trained = {n for n, _ in params}
        missing = trained - set(tensors["model"])
        if missing:
            from export.resume import StateError

            raise StateError(f"{resume.directory if resume else ''}: the saved state lacks {len(missing)} trained "
                             f"tensors, e.g. {sorted(missing)[0]}; pass --restart to discard it")
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n in trained:
                named[n].copy_(tensors["model"][n])
        opt.load_state_dict(tensors["optimizer"])
        sched.load_state_dict(tensors["scheduler"])
        torch.set_rng_state(tensors["torch_rng"])
        rng.bit_generator.state = record["numpy_rng"]
        losses = [float(x) for x in record["losses"]]
        start, seconds_before = int(record["step"]), float(record.get("seconds", 0.0))
        if record.get("threads") != torch.get_num_threads():
            log.warning("the saved state was trained with %s torch threads, this run has %d: the resumed run "
                        "may differ from an uninterrupted one in the last float bits",
                        record.get("threads"), torch.get_num_threads())
        log.info("loaded the training state of step %d in %.2f s", start, time.perf_counter() - loading)
        if progress:
            print(f"resuming the training at step {start}/{cfg.steps} from {resume.directory if resume else ''}",
                  flush=True)
    t0 = time.perf_counter()

    def save(step: int) -> None:
        if resume is None:
            return
        t = time.perf_counter()
        state = {"model": {n: p.detach().clone() for n, p in params}, "optimizer": opt.state_dict(),
                 "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state()}
        info = {"numpy_rng": rng.bit_generator.state, "losses": losses, "threads": torch.get_num_threads(),
                "seconds": round(seconds_before + time.perf_counter() - t0, 3)}
        save_state(resume.directory, setup, step, state, info)
        log.info("saved the training state at step %d in %.2f s", step, time.perf_counter() - t)

    def stop(reason: str, stage: str, step: int, saving: bool = True) -> None:
        assert resume is not None
        if saving:
            save(step)
        raise TrainingStopped(reason, step, cfg.steps, resume.directory, stage)

    watch = StopWatch(resume.deadline if resume is not None else None)
    try:
        with watch.armed() if resume is not None else contextlib.nullcontext(watch):
            media = None
            if not cfg.train_vision and start < cfg.steps:
                # stopped here, nothing has changed since the saved state (if any): the cache is the progress
                media = cached_media(model.encode_images, pixels, key, state_dir, watch if resume else None,
                                     progress, lambda reason, stage: stop(reason, stage, start, saving=False))
            bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not progress)
            if losses:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
            for step in range(start, cfg.steps):
                # one task per batch: similar lengths and image counts pad less
                task = int(rng.choice(len(TASKS), p=np.asarray(cfg.task_mix) / sum(cfg.task_mix)))
                batch = [examples.sample(users, rng, cfg, task) for _ in range(cfg.batch_size)]
                loss = batch_loss(model, batch, pixels, examples.vocab, cfg.gamma, cfg.slice_weight, media,
                                  cfg.tag_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update()
                if step % 10 == 0 or step == cfg.steps - 1:
                    bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
                done = step + 1
                if resume is None or done == cfg.steps:
                    continue
                if resume.stop_after is not None and done >= resume.stop_after:
                    bar.close()
                    stop("stop_after", "train", done)
                if (reason := watch.reason()) is not None:
                    bar.close()
                    stop(reason, "train", done)
                if resume.save_every and done % resume.save_every == 0:
                    save(done)
            bar.close()
            if resume is not None and start < cfg.steps:
                save(cfg.steps)  # a re-run (another export of the same training) skips the steps
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    seconds = seconds_before + time.perf_counter() - t0
    log.info("trained %d steps in %.1f s; loss %.3f -> %.3f", cfg.steps, seconds, losses[0], losses[-1])
    return TrainResult(cfg.steps, seconds, losses[0], float(np.mean(losses[-10:])), losses)


def quick_metrics(
    model: UniMP, examples: ShopExamples, train_users: list[dict[str, Any]], test_users: list[dict[str, Any]],
    media: torch.Tensor, k: int = 10, batch_size: int = 32,
) -> dict[str, float]:
    """A quick check on held-out users with the PyTorch model (not ``unimp eval``): recommendation and
    search HR@k (fast path: item-slice top-k, history and unavailable items excluded) beside popularity,
    rating RMSE (argmax of rate_1..5, and the expected rating) beside the user's mean, selection F1 of the top candidate beside a
    random pick."""
    v = examples.vocab
    token = {r.item_id: r.token for r in examples.records}
    unavailable = torch.tensor([not r.available for r in examples.records])
    counts = np.zeros(v.item_count)
    for u in train_users:
        for i in [h["item_id"] for h in u["history"]] + [u["next_item"]]:
            counts[token[i]] += 1
    out: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        for task, target_key in (("recommend", "next_item"), ("search", "search_item")):
            hits = pop_hits = 0
            for s in range(0, len(test_users), batch_size):
                users = test_users[s:s + batch_size]
                logits = answer_logits(model, [examples.example(task, u) for u in users], v, media=media)
                items = logits[:, v.item_start:v.item_start + v.item_count].clone()
                for b, u in enumerate(users):
                    seen = [token[h["item_id"]] for h in u["history"]]
                    row = items[b]
                    row[seen] = -torch.inf
                    row[unavailable] = -torch.inf
                    top = set(torch.topk(row, k).indices.tolist())
                    hits += token[u[target_key]] in top
                    pop = counts.copy()
                    pop[seen] = -1
                    pop[unavailable.numpy()] = -1
                    pop_hits += token[u[target_key]] in set(np.argsort(-pop, kind="stable")[:k].tolist())
            out[f"{task}_hr@{k}"] = hits / len(test_users)
            out[f"{task}_popularity_hr@{k}"] = pop_hits / len(test_users)
        err, expected_err, base_err = [], [], []
        f1, rand_f1 = [], []
        for s in range(0, len(test_users), batch_size):
            users = test_users[s:s + batch_size]
            logits = answer_logits(model, [examples.example("preference", u) for u in users], v, media=media)
            probs = torch.softmax(logits[:, v.rates], dim=-1)
            rates = probs.argmax(-1) + 1
            expected = probs @ torch.arange(1.0, 6.0)
            for b, u in enumerate(users):
                err.append(float(rates[b]) - u["rating"])
                expected_err.append(float(expected[b]) - u["rating"])
                base_err.append(float(np.mean([h["rating"] for h in u["history"]])) - u["rating"])
            logits = answer_logits(model, [examples.example("selection", u) for u in users], v, media=media)
            for b, u in enumerate(users):
                n = len(u["candidates"])
                pick = int(logits[b, v.selections[:n]].argmax())
                truth = set(u["selected"])
                f1.append(2 / (1 + len(truth)) if pick in truth else 0.0)  # P = hit, R = hit / |truth|
                rand_f1.append(len(truth) / n * 2 / (1 + len(truth)))  # a uniformly random single pick
        out["rating_rmse"] = float(np.sqrt(np.mean(np.square(err))))
        out["rating_expected_rmse"] = float(np.sqrt(np.mean(np.square(expected_err))))
        out["rating_user_mean_rmse"] = float(np.sqrt(np.mean(np.square(base_err))))
        out["selection_f1"] = float(np.mean(f1))
        out["selection_random_f1"] = float(np.mean(rand_f1))
    return out


def measure_checkpoint(ckpt: Path, split: str = "test") -> dict[str, float]:
    """``quick_metrics`` of a demo checkpoint directory (with its ``shop/``) on one split."""
    from export.checkpoints import load_checkpoint
    from export.shop import read_split

    ckpt = Path(ckpt)
    loaded = load_checkpoint(ckpt)
    lines = (ckpt / "catalog" / "items.jsonl").read_text().splitlines()
    records = [CatalogRecord(**json.loads(line)) for line in lines]
    examples = ShopExamples(records, loaded.tokenizer, loaded.vocab)
    model = loaded.model
    pixels = catalog_pixels(ckpt / "catalog", records, model.cfg.vision.image_size)
    with torch.no_grad():
        media = torch.cat([model.encode_images(pixels[i:i + 32]) for i in range(0, len(pixels), 32)])
    return quick_metrics(model, examples, read_split(ckpt / "shop", "train"), read_split(ckpt / "shop", split), media)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="quick held-out metrics of a demo checkpoint (PyTorch reference)")
    parser.add_argument("checkpoint", type=Path, help="demo checkpoint directory (ART/checkpoint)")
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"])
    args = parser.parse_args()
    print(json.dumps(measure_checkpoint(args.checkpoint, args.split), indent=2))
