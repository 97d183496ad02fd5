"""``Runtime``: every UniMP text task served from the exported graphs (implements runtime.api.Engine).

Request path: resolve the history against the catalog -> build the UniMP prompt -> media latents (cached
for catalog items, encoded for inline images) -> cross-attention K/V once per image -> prefix-cache lookup
-> prefill -> a decoding strategy (item-slice top-k, beam search, rating distribution, streamed text),
whose decode steps are batched with other requests' by the batcher (runtime.decoder: a ``Generator`` per
sequence over the KV layout's core).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime.api import ImageProgress, ImageRequest, ImageResult
from runtime.backends import BackendConfig, open_session
from runtime.catalog import Catalog
from runtime.decoder.batcher import Batcher
from runtime.decoder.core import ConcatCore, DecoderCore, InplaceCore, PrefillInput
from runtime.decoder.generator import Generator
from runtime.decoder.kv_cache import PrefixCache, prefix_key
from runtime.decoding.beam import AllowedTokensFn, BeamResult, BeamSearchConfig, beam_search
from runtime.decoding.detokenize import IncrementalDetokenizer, StrippedPieces
from runtime.decoding.itemslice import (
    admissible_items,
    hypothesis_items,
    item_topk,
    rating_distribution,
    select_candidates,
)
from runtime.decoding.sampling import SamplingConfig, TokenGenerator
from runtime.decoding.trie import TokenTrie
from runtime.limits import DEFAULT_BEAMS, Limits
from runtime.manifest import Manifest, load_manifest
from runtime.mediakv import BackgroundEncoder, MediaKVEncoder, MediaKVStore, MediaMemory, default_kv_dir
from runtime.prompts import (
    EncodedPrompt,
    Prompt,
    ResolvedItem,
    check_history_item,
    encode,
    preference_prompt,
    recommendation_prompt,
    search_prompt,
    selection_prompt,
)
from runtime.types import (
    BeamOptions,
    CancelToken,
    DecodeMode,
    HistoryItem,
    ImageModel,
    InvalidRequest,
    ItemFilter,
    ItemMeta,
    NotFound,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    RecommendResult,
    ScoredItem,
    SearchRequest,
    SelectRequest,
    SelectResult,
    TextPiece,
    Timings,
    check_cancel,
)
from runtime.vision import ItemStore, LatentStore, VisionEncoder

log = logging.getLogger(__name__)

_SENTINEL_FLOOR = -1.0e8
"""Beam scores at or below this are the search's -1e9 "no hypothesis" sentinel, not log-probabilities."""


@dataclass(frozen=True)
class RuntimeConfig:
    backend: BackendConfig = field(default_factory=BackendConfig)
    state_dir: Path | None = None
    """Where catalog edits persist (SQLite); None keeps them in memory."""
    latent_cache_dir: Path | None = None
    """Memory-mapped catalog latents; None: <artifacts>/.cache/latents. The cross-attention K/V sit beside
    them in <dir>-media-kv (and VQGAN codes in <dir>-vqgan-codes); ``unimp catalog encode`` fills all."""
    background_encode: bool = True
    """Encode catalog images missing from those stores in a background thread after start-up (False: only
    when a request first needs one). Start-up never waits for them either way."""
    prefix_cache_bytes: int = 256 << 20
    """Byte budget of the prompt-prefix KV cache (LRU)."""
    max_active: int = 8
    """Sequences decoding at once (continuous batching width)."""
    max_context: int = 0
    """Longest sequence (prompt + generated tokens) a request may reach; 0: the model's max_positions."""
    kv_pool_bytes: int = 0
    """KV pool of the inplace decoder layout, allocated once (untouched pages cost no memory); 0: room for
    ``max_active`` sequences plus one request of ``limits.max_beams`` beams at ``max_context``."""
    max_queued: int = 32
    """Requests waiting for a decode slot before new ones are refused (Overloaded)."""
    max_history: int = 4
    """History items in a prompt (UniMP evaluates with the last 4); fewer when the prompt would not fit."""
    limits: Limits = field(default_factory=Limits)
    """Bounds on top_k, beams and new tokens (the server passes its ``[limits]`` section)."""
    progress: bool = True


@dataclass
class Prefilled:
    """A prompt's prefill: where its logits came from and what it cost."""

    logits: np.ndarray
    """(V,) last-position logits."""
    prompt: Prompt
    vision_s: float
    prefill_s: float
    hit: bool


class SettingsError(ValueError):
    """A RuntimeConfig value the artifacts cannot serve (the message starts with the setting's name)."""


def pool_row_bytes(manifest: Manifest, max_context: int) -> int:
    """Bytes of one KV pool row: every layer's K and V at ``max_context`` + 1 positions and every
    cross-attention block's last-image K and V (float32)."""
    d = manifest.decoder
    kv = 2 * d.num_layers * d.num_heads * (max_context + 1) * d.head_dim
    memory = 2 * len(d.xattn_layers) * d.xattn_heads * manifest.vision.num_latents * d.xattn_head_dim
    return 4 * (kv + memory)


def context_of(manifest: Manifest, config: RuntimeConfig) -> int:
    """The serving maximum context: ``config.max_context`` within the model's positions (0: all of them)."""
    positions = manifest.decoder.max_positions
    if config.max_context < 0 or config.max_context > positions:
        raise SettingsError(f"max_context: must be in 0..{positions} (the model's positions), got {config.max_context}")
    return config.max_context or positions


def _pool_rows(manifest: Manifest, config: RuntimeConfig) -> int:
    """KV rows (a beam each) the batcher may hand out: from ``kv_pool_bytes``, else room for ``max_active``
    sequences plus one request of ``max_beams`` beams."""
    beams = config.limits.max_beams
    if config.kv_pool_bytes <= 0:
        return config.max_active + beams - 1
    row = pool_row_bytes(manifest, context_of(manifest, config))
    rows = config.kv_pool_bytes // row
    if rows < beams:
        raise SettingsError(
            f"kv_pool_bytes: {config.kv_pool_bytes} bytes hold {rows} KV rows of {row} bytes "
            f"(max_context {context_of(manifest, config)}), fewer than limits.max_beams ({beams}); "
            "raise kv_pool_bytes, lower max_context or lower limits.max_beams"
        )
    return int(rows)


def _open_core(root: Path, manifest: Manifest, config: RuntimeConfig) -> DecoderCore:
    """The decoder core for the manifest's KV layout."""
    graphs, backend = manifest.graphs, config.backend
    decoder = open_session(root / graphs["decoder"].file, backend)
    media_kv = open_session(root / graphs["media_kv"].file, backend)
    context = context_of(manifest, config)
    layout = manifest.decoder.kv_layout
    if layout == "inplace":
        return InplaceCore(decoder, media_kv, manifest, slots=_pool_rows(manifest, config), max_context=context)
    if layout == "concat":
        return ConcatCore(decoder, media_kv, manifest, max_context=context)
    raise ValueError(f"manifest decoder.kv_layout {layout!r} is not one this runtime serves (inplace, concat)")


class Runtime:
    """The serving engine. Thread-safe: the gRPC server calls it from a thread pool."""

    def __init__(self, root: Path, manifest: Manifest, config: RuntimeConfig) -> None:
        self.root = root
        self.manifest = manifest
        self.config = config
        backend = config.backend
        graphs = manifest.graphs
        self.tokenizer = Tokenizer.from_file(str(root / manifest.tokenizer))
        self.vision = VisionEncoder(open_session(root / graphs["vision"].file, backend), manifest)
        self.decoder = _open_core(root, manifest, config)
        self._catalog = Catalog(root, manifest, state_dir=config.state_dir)
        cache_dir = config.latent_cache_dir or root / ".cache" / "latents"
        self.latents = LatentStore.open(cache_dir, self._catalog, self.vision, manifest, fill=False)
        kv = MediaKVEncoder(open_session(root / graphs["media_kv"].file, backend), manifest)
        self.media_kv = MediaKVStore.open(default_kv_dir(cache_dir), self.latents, kv, self._catalog, fill=False)
        self.media = MediaMemory(self.vision, kv, self.media_kv)
        stores: list[ItemStore] = [self.latents, self.media_kv]
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        self.batcher = Batcher(self.decoder, config.max_active, config.max_queued, rows=_pool_rows(manifest, config))
        self._vqgan = None
        self.codes = None
        if "vqgan_encoder" in graphs and "vqgan_decoder" in graphs:
            from runtime.vqgan import CodeEncoder, CodeStore, VQGANCodec, default_codes_dir

            self._vqgan = VQGANCodec(open_session(root / graphs["vqgan_encoder"].file, backend),
                                     open_session(root / graphs["vqgan_decoder"].file, backend), manifest)
            self.codes = CodeStore.open(default_codes_dir(cache_dir), self._catalog, CodeEncoder(self._vqgan), manifest,
                                        fingerprint=self._vqgan.fingerprint, fill=False)
            stores.append(self.codes)
        self.catalog_encoder = BackgroundEncoder(stores, busy=self.media.recently_used)
        """Encodes the stores' pending catalog images while serving (see ``background_encode``)."""
        if config.background_encode:
            self.catalog_encoder.start()
        self._diffusion = None
        if "unet" in graphs:
            from runtime.diffusion.pipeline import DiffusionPipeline

            self._diffusion = DiffusionPipeline.from_artifacts(root, manifest, lambda p: open_session(p, backend))
        t = manifest.tokens
        self.ban_specialned = np.array([t.image, t.answer, t.pad], np.int64)
        self.requests = 0
        self._semantic_trie: TokenTrie | None = None
        """Semantic-ID items: every table row spelled after the answer prefix (built once: the table never
        changes, catalog edits only move items between rows and change the masks applied to it)."""
        if self._catalog.semantic is not None:
            spellings = self._catalog.semantic.spellings(t)  # (N, 4) token ids
            self._semantic_trie = TokenTrie.from_sequences(spellings, t.eos, prefix=self._answer_prefix)
            self._semantic_trie.build_index()  # now, not in a request thread: later masked views only read it

    @classmethod
    def open(cls, artifacts: str | Path, config: RuntimeConfig | None = None) -> Runtime:
        root = Path(artifacts)
        manifest = load_manifest(root, verify=True)
        return cls(root, manifest, config or RuntimeConfig())

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated) a request may reach."""
        return self.decoder.max_context

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def close(self) -> None:
        """Stop decoding and the background encoder, persist entries computed since start-up, close the catalog."""
        self.batcher.close()
        self.catalog_encoder.close()
        self.latents.close()
        self.media_kv.close()
        if self.codes is not None:
            self.codes.close()
        self._catalog.close()

    def forget_user(self, tenant: str, user_id: str) -> int:
        """Drop the cached prefixes computed from (or served to) the tenant's user's stored history."""
        return self.prefix_cache.forget((tenant, user_id))

    def stats(self) -> dict[str, float]:
        pc = self.prefix_cache
        copied = {f"kv_copy_bytes_{cause}": float(v) for cause, v in self.decoder.copy_bytes().items()}
        return {
            **copied,
            "kv_pool_bytes": float(self.decoder.pool_bytes),
            "kv_pool_rows": float(self.batcher.rows),
            "kv_pool_rows_used": float(self.batcher.reserved_rows),
            "kv_bytes": float(self.batcher.kv_bytes),
            "prefix_cache_bytes": float(pc.bytes),
            "prefix_cache_entries": float(len(pc)),
            "prefix_cache_hits": float(pc.hits),
            "prefix_cache_misses": float(pc.misses),
            "prefix_cache_hit_rate": pc.hit_rate,
            "queue_depth": float(self.batcher.queue_depth),
            "active_sequences": float(self.batcher.active),
            "decode_steps": float(self.batcher.steps),
            "decode_rows": float(self.batcher.batched_rows),
            **self.catalog_stats(),
        }

    def catalog_stats(self) -> dict[str, float]:
        """Per store (latents, media_kv, vqgan codes): catalog images encoded, pending, and encoded on first use,
        as ``catalog_encoded.<store>``, ``catalog_pending.<store>``, ``catalog_on_demand.<store>``."""
        out = {}
        for store in self.catalog_encoder.stores:
            s = store.stats()
            out[f"catalog_encoded.{store.KIND}"] = s["items"]
            out[f"catalog_pending.{store.KIND}"] = s["pending"]
            out[f"catalog_on_demand.{store.KIND}"] = s["encoded_on_demand"]
        return out

    # -- request plumbing -------------------------------------------------------------------------------
    def resolve(self, items: tuple[HistoryItem, ...], name: str = "history") -> tuple[ResolvedItem, ...]:
        """Items checked by the same rule RecordInteraction writes with, resolved against the catalog."""
        return tuple(self._resolve_one(item, f"{name}[{k}]") for k, item in enumerate(items))

    def _resolve_one(self, item: HistoryItem, path: str) -> ResolvedItem:
        """An item without an image (inline, or a catalog item that has none) becomes a chunk without its
        own ``<image>``."""
        check_history_item(item, path)
        meta, token, has_image = item.meta, -1, bool(item.image)
        if item.item_id:
            try:
                entry = self._catalog.get(item.item_id)
            except NotFound as exc:
                raise NotFound(f"{path}.item_id: {item.item_id!r} is not in the catalog",
                               field=f"{path}.item_id") from exc
            meta = meta or entry.meta
            token = entry.token
            has_image = has_image or entry.has_image
        return ResolvedItem(meta or ItemMeta(), item.item_id, token, item.image, item.rating, item.explanation,
                            has_image, self._catalog.semantic_codes(token))

    def admit(self, cancel: CancelToken | None = None, rows: int = 1):  # type: ignore[no-untyped-def]
        """A decode ``Generator`` with ``rows`` KV rows (beams) reserved (context manager; Overloaded when the
        queue is full). Tasks that only need the prompt's logits do not take one."""
        return self.batcher.admit(cancel, rows)

    def prefill(self, prompt: Prompt | EncodedPrompt, tenant: str, cancel: CancelToken | None,
                user_id: str = "", generator: Generator | None = None) -> Prefilled:
        """Prefill one prompt (tokenized here unless ``_fit`` already did) through the prefix cache.

        With ``generator`` the prompt's KV goes into its first row for decoding; without, into buffers of
        the prompt's own (for tasks that read only the prompt's logits)."""
        check_cancel(cancel)
        t = self.manifest.tokens
        enc = prompt if isinstance(prompt, EncodedPrompt) else encode(prompt, self.tokenizer, t.endofchunk, t.image)
        prompt = enc.prompt
        limit = self.decoder.max_context
        if len(enc.ids) >= limit:
            raise InvalidRequest(
                f"history: prompt of {len(enc.ids)} tokens exceeds the {limit}-token context "
                f"(the model has {self.manifest.decoder.max_positions} positions)",
                field="history",
            )
        memory, vision_s = self.media.memory_for(prompt.images)
        check_cancel(cancel)
        t0 = time.perf_counter()
        entry, key, owner = None, "", None
        if enc.prefix_len:
            key = prefix_key(tenant, enc.ids[: enc.prefix_len], [it.image_key for it in prompt.images[: prompt.prefix_images]])
            owner = (tenant, user_id) if user_id else None
            entry = self.prefix_cache.get(key, owner)
        request = PrefillInput(enc.ids, memory, prompt.prefix_images, entry,
                               keep_prefix=enc.prefix_len if entry is None else 0)
        if generator is not None:
            generator.cancel = cancel
            out = generator.prefill(request)
        else:
            out = self.decoder.prefill_private(request)
        if out.entry is not None:
            self.prefix_cache.put(key, out.entry, owner)
        return Prefilled(out.logits, prompt, vision_s, time.perf_counter() - t0, entry is not None)

    def _fit(self, build: Callable[[int], Prompt], history_len: int, blame: str) -> EncodedPrompt:
        """The prompt with the most recent history items (up to ``max_history``) that fits the model.

        ``build(n)`` makes the prompt from the newest ``n`` history items. The oldest items are dropped
        until the prompt leaves room for one generated token. When even the newest item alone does not
        fit, the error names the newest history item if the prompt would fit without its chunk, else
        ``blame`` (``query``, ``target``, ``candidates``), with the token counts.
        """
        limit = self.decoder.max_context - 1
        t = self.manifest.tokens
        n = history_len if self.config.max_history <= 0 else min(self.config.max_history, history_len)
        n = start = max(n, 1)
        while True:
            prompt = build(n)
            enc = encode(prompt, self.tokenizer, t.endofchunk, t.image)
            length = len(enc.ids)
            if length <= limit:
                if n < start:
                    log.debug("prompt fits with the newest %d history items (%d tokens)", n, length)
                return enc
            if n == 1:
                if length - enc.prefix_len <= limit:  # the rest fits: the newest history item alone is too long
                    blame = f"history[{history_len - 1}]"
                    raise InvalidRequest(
                        f"{blame}: this item's history chunk is {enc.prefix_len} tokens, so the prompt is {length} "
                        f"tokens; the model takes at most {limit} prompt tokens ({limit + 1} positions)",
                        field=blame,
                    )
                raise InvalidRequest(
                    f"{blame}: the prompt is {length} tokens even with only the newest history item; "
                    f"the model takes at most {limit} prompt tokens ({limit + 1} positions)",
                    field=blame,
                )
            n -= 1

    def _check_decoding(self, top_k: int, mode: DecodeMode, beam: BeamOptions) -> None:
        """top_k, beam width and new tokens within ``config.limits`` (see runtime.limits for the semantics)."""
        lim = self.config.limits
        if not 1 <= top_k <= lim.max_top_k:
            raise InvalidRequest(f"top_k: must be in 1..{lim.max_top_k}, got {top_k}", field="top_k")
        if mode == DecodeMode.FAST:
            return
        if top_k > lim.beam_top_k_limit():
            raise InvalidRequest(
                f"top_k: is {top_k}, above the limit of {lim.beam_top_k_limit()} in beam mode (one item per beam)",
                field="top_k",
            )
        if not 1 <= beam.num_beams <= lim.max_beams:
            raise InvalidRequest(f"beam.num_beams: must be in 1..{lim.max_beams}, got {beam.num_beams}",
                                 field="beam.num_beams")
        if mode == DecodeMode.BEAM_CONSTRAINED:
            return  # one item per beam; num_return_sequences and max_new_tokens do not apply
        if not 1 <= beam.num_return_sequences <= beam.num_beams:
            raise InvalidRequest(f"beam.num_return_sequences: must be in 1..num_beams ({beam.num_beams}), got "
                                 f"{beam.num_return_sequences}", field="beam.num_return_sequences")
        if not 1 <= beam.max_new_tokens <= lim.max_new_tokens:
            raise InvalidRequest(f"beam.max_new_tokens: must be in 1..{lim.max_new_tokens}, got {beam.max_new_tokens}",
                                 field="beam.max_new_tokens")

    def ban_special(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = np.array(scores, copy=True)
        scores[..., self.ban_specialned] = -np.inf  # no new image, answer or pad token can be generated
        return scores

    # -- recommendation and search ----------------------------------------------------------------------
    def recommend(self, request: RecommendRequest) -> RecommendResult:
        history = self.resolve(request.history)
        prompt = self._fit(lambda n: recommendation_prompt(history, n), len(history), f"history[{len(history) - 1}]")
        return self._rank_items(prompt, request.top_k, request.mode, request.filter, request.beam, request.tenant,
                                request.cancel, request.user_id)

    def search(self, request: SearchRequest) -> RecommendResult:
        history = self.resolve(request.history)
        prompt = self._fit(lambda n: search_prompt(history, request.query, n), len(history), "query")
        return self._rank_items(prompt, request.top_k, request.mode, request.filter, request.beam, request.tenant,
                                request.cancel, request.user_id)

    def _item_masks(self, item_filter: ItemFilter, history: tuple[int, ...]) -> dict[str, np.ndarray | None]:
        allow = None
        if item_filter.allow:
            allow = np.array([self._token_for(item_id, f"filter.allow_item_ids[{i}]")
                              for i, item_id in enumerate(item_filter.allow)], np.int64)
        return {
            "exclude": np.array(history, np.int64) if item_filter.exclude_history and history else None,
            "unavailable": ~self._catalog.available_mask(),
            "allow": allow,
            "category_mask": self._catalog.category_mask(list(item_filter.categories)) if item_filter.categories else None,
        }

    def _token_for(self, item_id: str, field_name: str) -> int:
        try:
            token = self._catalog.token_of(item_id)
        except NotFound as exc:
            raise NotFound(f"{field_name}: unknown catalog item {item_id!r}", field=field_name) from exc
        if token < 0:
            raise InvalidRequest(f"{field_name}: item {item_id!r} has no model token", field=field_name)
        return token

    def _rank_items(
        self,
        prompt: EncodedPrompt,
        top_k: int,
        mode: DecodeMode,
        item_filter: ItemFilter,
        beam: BeamOptions,
        tenant: str,
        cancel: CancelToken | None,
        user_id: str = "",
    ) -> RecommendResult:
        self._check_decoding(top_k, mode, beam)
        lim = self.config.limits
        if self._semantic_trie is not None and mode == DecodeMode.FAST and top_k > lim.beam_top_k_limit():
            raise InvalidRequest(
                f"top_k: is {top_k}, above the limit of {lim.beam_top_k_limit()} for semantic-ID items (fast mode "
                "is a constrained beam search, one item per beam)", field="top_k",
            )
        t_start = time.perf_counter()
        self.requests += 1
        t = self.manifest.tokens
        masks = self._item_masks(item_filter, prompt.prompt.history_tokens)
        decode_s, tokens = 0.0, 0
        if self._semantic_trie is None and mode == DecodeMode.FAST:  # the prompt's logits alone
            pre = self.prefill(prompt, tenant, cancel, user_id)
            ranked = item_topk(pre.logits, t.item_start, t.item_count, top_k, **masks).pairs()  # type: ignore[arg-type]
        else:
            rows = beam.num_beams
            if self._semantic_trie is not None and mode == DecodeMode.FAST:
                rows = self._semantic_fast_beams(top_k)
            with self.admit(cancel, rows) as gen:
                pre = self.prefill(prompt, tenant, cancel, user_id, gen)
                t0 = time.perf_counter()
                if self._semantic_trie is not None:
                    ranked, tokens = self._semantic_items(self._semantic_trie, pre, gen, top_k, mode, beam, masks, cancel)
                elif mode == DecodeMode.BEAM_CONSTRAINED:
                    ranked, tokens = self._constrained_beam_items(pre, gen, top_k, beam, masks, cancel)
                else:
                    ranked, tokens = self._beam_items(pre, gen, beam, masks, cancel)
                    ranked = ranked[:top_k]
                decode_s = time.perf_counter() - t0
        items = []
        for index, score in ranked:
            entry = self._catalog.by_token(index)
            items.append(ScoredItem(entry.item_id if entry else f"item_{index}", float(score), entry.meta if entry else None))
        total = time.perf_counter() - t_start
        timings = Timings(pre.vision_s, pre.prefill_s, decode_s, total, pre.vision_s + pre.prefill_s, tokens, pre.hit)
        return RecommendResult(tuple(items), timings)

    def _beam_items(
        self, pre: Prefilled, gen: Generator, beam: BeamOptions, masks: dict[str, np.ndarray | None],
        cancel: CancelToken | None,
    ) -> tuple[list[tuple[int, float]], int]:
        """Paper-parity beam search over the whole vocabulary; returns the items the hypotheses spell.

        Each hypothesis, best first, contributes the first item token it contains if that item is
        admissible and not contributed yet, scored by the hypothesis's length-penalised sequence score.
        Possibly fewer items than hypotheses, possibly none."""
        t = self.manifest.tokens
        result = self._run_beams(pre, gen, self._paper_beam_config(beam), cancel)
        ok = admissible_items(t.item_count, **masks)  # type: ignore[arg-type]
        return hypothesis_items(result, t.item_start, ok), int(result.steps)

    def _paper_beam_config(self, beam: BeamOptions) -> BeamSearchConfig:
        """The request's beam options as HF-semantics beam search settings (the paper's DECODE_MODE_BEAM)."""
        t = self.manifest.tokens
        return BeamSearchConfig(
            num_beams=beam.num_beams,
            num_return_sequences=beam.num_return_sequences,
            max_new_tokens=beam.max_new_tokens,
            length_penalty=beam.length_penalty,
            early_stopping=beam.early_stopping,
            eos_token_id=t.eos,
            pad_token_id=t.pad,
        )

    def _constrained_beam_items(
        self, pre: Prefilled, gen: Generator, top_k: int, beam: BeamOptions, masks: dict[str, np.ndarray | None],
        cancel: CancelToken | None,
    ) -> tuple[list[tuple[int, float]], int]:
        """Beam search constrained to admissible catalog items: min(top_k, admissible) distinct items.

        The trie spells admissible item ``k`` as the answer prefix (see ``_answer_prefix``), then
        ``item_k``, then EOS, so every hypothesis is one item and all have the same length; scores are
        unpenalised sequence log-probabilities (length_penalty 0). With ``num_beams >= top_k`` beams and
        at least ``top_k`` admissible items, the ``num_beams`` surviving beams after the item step are
        distinct admissible items, so ``top_k`` of them come back.
        """
        if beam.num_beams < top_k:
            raise InvalidRequest(f"beam.num_beams: must be >= top_k ({top_k}) in constrained beam mode, "
                                 f"got {beam.num_beams}", field="beam.num_beams")
        t = self.manifest.tokens
        ok = admissible_items(t.item_count, **masks)  # type: ignore[arg-type]
        admissible = np.flatnonzero(ok)  # (A,) item indices
        if admissible.size == 0:
            return [], 0
        prefix = self._answer_prefix
        trie = TokenTrie.atomic_items(t.item_start, admissible, t.eos, prefix)
        cfg = BeamSearchConfig(
            num_beams=beam.num_beams,
            num_return_sequences=beam.num_beams,
            max_new_tokens=len(prefix) + 2,  # prefix, item, EOS
            length_penalty=0.0,
            eos_token_id=t.eos,
            pad_token_id=t.pad,
        )
        result = self._run_beams(pre, gen, cfg, cancel, allowed_tokens=trie.allowed, ban=False)
        ranked: list[tuple[int, float]] = []
        seen: set[int] = set()
        for seq, score in zip(result.sequences(), result.scores):
            index = trie.lookup(seq)
            # rows that never left the search's -1e9 sentinel (fewer admissible items than beams) repeat items
            if index < 0 or index in seen or not score > _SENTINEL_FLOOR:
                continue
            seen.add(index)
            ranked.append((index, float(score)))
        return ranked[:top_k], int(result.steps)

    def _semantic_fast_beams(self, top_k: int) -> int:
        """Beams of the constrained search that FAST mode runs for semantic-ID items."""
        return min(max(top_k, DEFAULT_BEAMS), self.config.limits.max_beams)

    def _semantic_items(
        self, trie: TokenTrie, pre: Prefilled, gen: Generator, top_k: int, mode: DecodeMode, beam: BeamOptions,
        masks: dict[str, np.ndarray | None], cancel: CancelToken | None,
    ) -> tuple[list[tuple[int, float]], int]:
        """Semantic-ID items: (row, score) best first, from a beam search over 4-token ids.

        FAST and BEAM_CONSTRAINED run a beam search constrained to the admissible items' spellings
        (answer prefix, ``item_a item_b item_c item_last_d``, EOS: every beam is a valid, admissible id;
        unpenalised log-probabilities), FAST with ``num_beams = max(top_k, 10)`` capped by
        ``limits.max_beams``, BEAM_CONSTRAINED with the request's ``num_beams`` (>= top_k). BEAM is the
        paper's unconstrained search; a hypothesis counts when it spells a whole admissible id exactly.
        With at least as many beams as admissible items the constrained search is exact (every prefix of
        every admissible id survives each step)."""
        t = self.manifest.tokens
        ok = admissible_items(self._catalog.item_count, **masks)  # type: ignore[arg-type]
        if mode == DecodeMode.BEAM:
            result = self._run_beams(pre, gen, self._paper_beam_config(beam), cancel)
            return self._trie_items(result, trie.masked(ok).lookup)[:top_k], int(result.steps)
        if mode == DecodeMode.FAST:
            num_beams = self._semantic_fast_beams(top_k)
        else:
            num_beams = beam.num_beams
            if num_beams < top_k:
                raise InvalidRequest(f"beam.num_beams: must be >= top_k ({top_k}) in constrained beam mode, "
                                     f"got {num_beams}", field="beam.num_beams")
        view = trie.masked(ok)
        if len(view) == 0:
            return [], 0
        cfg = BeamSearchConfig(
            num_beams=num_beams,
            num_return_sequences=num_beams,
            max_new_tokens=trie.max_length + 1,  # prefix, 4 codes, EOS
            length_penalty=0.0,
            eos_token_id=t.eos,
            pad_token_id=t.pad,
        )
        result = self._run_beams(pre, gen, cfg, cancel, allowed_tokens=view.allowed, ban=False)
        return self._trie_items(result, view.lookup)[:top_k], int(result.steps)

    @staticmethod
    def _trie_items(result: BeamResult, lookup: Callable[[np.ndarray], int]) -> list[tuple[int, float]]:
        """Distinct items the hypotheses spell (``lookup``: tokens -> item or -1), best first; rows still at
        the search's -1e9 sentinel (fewer admissible items than beams) are skipped."""
        ranked: list[tuple[int, float]] = []
        seen: set[int] = set()
        for seq, score in zip(result.sequences(), result.scores):
            index = lookup(seq)
            if index < 0 or index in seen or not score > _SENTINEL_FLOOR:
                continue
            seen.add(index)
            ranked.append((index, float(score)))
        return ranked

    @cached_property
    def _answer_prefix(self) -> tuple[int, ...]:
        """Tokens before ``item_k`` when the tokenizer encodes the reference answer `` item_k`` (UniMP's
        target follows ``<answer>`` with a space): the byte-level BPE's whitespace token, or nothing."""
        t = self.manifest.tokens
        name = self.tokenizer.id_to_token(t.item_start)
        ids = self.tokenizer.encode(f" {name}", add_special_tokens=False).ids if name else []
        if not ids or ids[-1] != t.item_start:
            log.warning("the tokenizer does not encode ' %s' as a prefix then the item token (%s); "
                        "constrained beams spell items without a prefix", name, ids)
            return ()
        return tuple(int(i) for i in ids[:-1])

    def _run_beams(
        self, pre: Prefilled, gen: Generator, cfg: BeamSearchConfig, cancel: CancelToken | None, *,
        allowed_tokens: AllowedTokensFn | None = None, ban: bool = True,
    ) -> BeamResult:
        """Beam search from the prefill on ``gen`` (its rows fork from the prompt row at the first step);
        ``ban``: no image, answer or pad token. New tokens are capped by the context left."""
        processor = self.ban_special if ban else None
        cfg = replace(cfg, max_new_tokens=max(1, min(cfg.max_new_tokens, gen.room)))
        return beam_search(pre.logits, gen.advance_beams, cfg, logits_processor=processor,
                           allowed_tokens=allowed_tokens, cancel=cancel)

    # -- preference and explanation ---------------------------------------------------------------------
    def _preference_prompt(self, request: PreferenceRequest) -> EncodedPrompt:
        """The request's sampling options checked, and its rating prompt fitted to the model."""
        history = self.resolve(request.history)
        target = self._resolve_one(request.target, "target")
        s = request.sampling
        lim = self.config.limits
        if not 0 <= s.temperature <= 5:
            raise InvalidRequest(f"sampling.temperature: must be in 0..5, got {s.temperature}",
                                 field="sampling.temperature")
        if not 0 < s.top_p <= 1:
            raise InvalidRequest(f"sampling.top_p: must be in (0, 1], got {s.top_p}", field="sampling.top_p")
        if not 1 <= s.max_new_tokens <= lim.max_new_tokens:
            raise InvalidRequest(f"sampling.max_new_tokens: must be in 1..{lim.max_new_tokens}, got {s.max_new_tokens}",
                                 field="sampling.max_new_tokens")
        if not 1 <= s.num_beams <= lim.max_beams:
            raise InvalidRequest(f"sampling.num_beams: must be in 1..{lim.max_beams}, got {s.num_beams}",
                                 field="sampling.num_beams")
        self.requests += 1
        return self._fit(lambda n: preference_prompt(history, target, n), len(history), "target")

    def predict_preference(self, request: PreferenceRequest) -> PreferenceResult:
        """Rating only: the distribution over ``rate_1..rate_5`` from the prompt's prefill alone.

        No decode slot is taken and no text is generated (``explanation`` "", ``finish_reason`` "",
        ``timings.tokens`` 0); the distribution is the one ``explain`` reports for the same request.
        ``request.sampling`` is validated as for ``explain`` but not used."""
        t_start = time.perf_counter()
        pre = self.prefill(self._preference_prompt(request), request.tenant, request.cancel, request.user_id)
        dist = rating_distribution(pre.logits, self.manifest.tokens.rates)
        return PreferenceResult(
            rating_distribution=tuple(float(p) for p in dist.probs),
            expected_rating=dist.expected,
            rating=dist.rating,
            timings=Timings(pre.vision_s, pre.prefill_s, 0.0, time.perf_counter() - t_start,
                            pre.vision_s + pre.prefill_s, 0, pre.hit),
        )

    def explain(self, request: PreferenceRequest) -> Iterator[TextPiece | PreferenceResult]:
        """Rating distribution from the prefill; then ``rate_r`` (the argmax) and the explanation, streamed.

        The explanation is the decoded text without leading or trailing whitespace, and the streamed
        pieces concatenate to exactly that text (greedy, sampled, and beam: one piece, the whole text)."""
        t_start = time.perf_counter()
        prompt = self._preference_prompt(request)
        with self.admit(request.cancel, max(1, request.sampling.num_beams)) as gen:
            pre = self.prefill(prompt, request.tenant, request.cancel, request.user_id, gen)
            yield from self._explain_decode(request, pre, gen, t_start)

    def _explain_decode(self, request: PreferenceRequest, pre: Prefilled, gen: Generator,
                        t_start: float) -> Iterator[TextPiece | PreferenceResult]:
        t = self.manifest.tokens
        s = request.sampling
        dist = rating_distribution(pre.logits, t.rates)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        stripped = StrippedPieces()
        first_token_s = 0.0
        produced = 0
        finish = "eos"
        t0 = time.perf_counter()
        rate_token = np.array([t.rates[dist.rating - 1]], np.int64)
        logits = gen.step(rate_token)
        max_new = max(1, min(s.max_new_tokens, gen.room))
        if s.num_beams > 1:
            cfg = BeamSearchConfig(num_beams=s.num_beams, max_new_tokens=max_new, eos_token_id=t.eos,
                                   pad_token_id=t.pad)
            result = beam_search(logits[0], gen.advance_beams, cfg, logits_processor=self.ban_special,
                                 cancel=request.cancel)
            best = result.sequences()[0]
            finish = "eos" if len(best) and int(best[-1]) == t.eos else "length"
            produced = len(best)
            first_token_s = time.perf_counter() - t_start
            piece = stripped.push(self.tokenizer.decode(best.tolist(), skip_special_tokens=True))
            if piece:
                yield TextPiece(piece)
        else:
            sampler = TokenGenerator(
                logits[0], gen.advance,
                SamplingConfig(s.temperature, s.top_p, s.seed, max_new, t.eos),
                cancel=request.cancel, logits_processor=self.ban_special,
            )
            while not sampler.is_done():
                token = sampler.step()
                if token is None:
                    break
                produced += 1
                piece = stripped.push(detok.push(token))
                if piece:
                    if not first_token_s:
                        first_token_s = time.perf_counter() - t_start
                    yield TextPiece(piece)
            tail = stripped.push(detok.flush())
            if tail:
                yield TextPiece(tail)
            finish = sampler.finish_reason or "eos"
            if finish == "cancelled":
                check_cancel(request.cancel)
        decode_s = time.perf_counter() - t0
        yield PreferenceResult(
            rating_distribution=tuple(float(p) for p in dist.probs),
            expected_rating=dist.expected,
            rating=dist.rating,
            explanation=stripped.text,
            finish_reason=finish,
            timings=Timings(pre.vision_s, pre.prefill_s, decode_s, time.perf_counter() - t_start,
                            first_token_s or (pre.vision_s + pre.prefill_s), produced, pre.hit),
        )

    # -- item selection ---------------------------------------------------------------------------------
    def select_items(self, request: SelectRequest) -> SelectResult:
        t_start = time.perf_counter()
        history = self.resolve(request.history)
        candidates = self.resolve(request.candidates, name="candidates")
        if not 1 <= request.max_selected <= max(1, len(candidates)):
            raise InvalidRequest(f"max_selected: must be in 1..{max(1, len(candidates))} (the number of candidates), "
                                 f"got {request.max_selected}", field="max_selected")
        self.requests += 1
        prompt = self._fit(lambda n: selection_prompt(history, candidates, n), len(history), "candidates")
        pre = self.prefill(prompt, request.tenant, request.cancel, request.user_id)
        sel = select_candidates(pre.logits, self.manifest.tokens.selections, len(candidates), request.max_selected)
        timings = Timings(pre.vision_s, pre.prefill_s, 0.0, time.perf_counter() - t_start, pre.vision_s + pre.prefill_s, 0, pre.hit)
        return SelectResult(sel.selected, sel.scores, timings)

    # -- image generation -------------------------------------------------------------------------------
    def generate_image(self, request: ImageRequest) -> Iterator[ImageProgress | ImageResult]:
        """``request.model`` picks the path (runtime.image_task.choose_image_model): VQGAN codes or diffusion."""
        from runtime.image_task import choose_image_model, generate_image, generate_image_codes

        model = choose_image_model(request.model, self._vqgan is not None, self._diffusion is not None)
        if model == ImageModel.VQGAN:
            assert self._vqgan is not None
            yield from generate_image_codes(self, self._vqgan, request)
            return
        assert self._diffusion is not None
        yield from generate_image(self, self._diffusion, request)
