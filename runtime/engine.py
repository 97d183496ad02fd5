"""``Runtime``: every UniMP text task served from the exported graphs (implements runtime.api.Engine).

Request path: resolve the history against the catalog -> build the UniMP prompt -> media latents (cached
for catalog items, encoded for inline images) -> cross-attention K/V once per image -> prefix-cache lookup
-> prefill -> a decoding strategy (item-slice top-k, beam search, rating distribution, streamed text),
whose decode steps are batched with other requests' by the batcher (runtime.decoder: a ``Generator`` per
sequence over the KV layout's core).
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from runtime.api import ImageProgress, ImageRequest, ImageResult
from runtime.backends import BackendConfig, Session, open_session
from runtime.catalog import Catalog
from runtime.decoder.batcher import Batcher
from runtime.decoder.core import ConcatCore, DecoderCore, InplaceCore, PrefillInput
from runtime.decoder.generator import Generator
from runtime.decoder.kv_cache import PrefixCache, prefix_key
from runtime.decoding.trie import TokenTrie
from runtime.limits import Limits
from runtime.manifest import Manifest, load_manifest
from runtime.prompts import (
    EncodedPrompt,
    Prompt,
    ResolvedItem,
    check_history_item,
    encode,
)
from runtime.tasks import preference as preference_task
from runtime.tasks import recommend as recommend_task
from runtime.tasks import selection as selection_task
from runtime.types import (
    CancelToken,
    HistoryItem,
    ImageModel,
    InvalidRequest,
    ItemMeta,
    NotFound,
    PreferenceRequest,
    PreferenceResult,
    RecommendRequest,
    RecommendResult,
    SearchRequest,
    SelectRequest,
    SelectResult,
    TextPiece,
    check_cancel,
)
from runtime.vision import ItemStore, LatentStore, VisionEncoder
from runtime.vision.catalog_encode import BackgroundEncoder
from runtime.vision.media_kv import MediaKVEncoder, MediaKVStore, MediaMemory, default_kv_dir

log = logging.getLogger(__name__)



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


def _physical_memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 0


def pool_rows(manifest: Manifest, config: RuntimeConfig, memory: int) -> int:
    """KV rows (a beam each) the batcher may hand out on a machine with ``memory`` bytes (0: unknown): from
    ``kv_pool_bytes``; by default room for ``max_active`` sequences plus one request of ``max_beams`` beams,
    within half of ``memory`` (never fewer than ``max_beams`` rows). ``unimp plan`` calls it with a board's
    memory, so the plan and the server size the pool alike."""
    beams = config.limits.max_beams
    row = pool_row_bytes(manifest, context_of(manifest, config))
    if config.kv_pool_bytes <= 0:
        rows = config.max_active + beams - 1
        if memory and rows * row > memory // 2:
            rows = max(beams, memory // 2 // row)
            log.info("KV pool: %d rows of %.1f MB fit half of this machine's %.1f GB", rows, row / 1e6, memory / 1e9)
        if memory and rows * row > memory:
            log.warning("KV pool: %d rows of %.1f MB exceed this machine's memory (%.1f GB) if all are used; "
                        "lower --engine-max-context or --limits-max-beams", rows, row / 1e6, memory / 1e9)
        return int(rows)
    rows = config.kv_pool_bytes // row
    if rows < beams:
        raise SettingsError(
            f"kv_pool_bytes: {config.kv_pool_bytes} bytes hold {rows} KV rows of {row} bytes "
            f"(max_context {context_of(manifest, config)}), fewer than limits.max_beams ({beams}); "
            "raise kv_pool_bytes, lower max_context or lower limits.max_beams"
        )
    return int(rows)


def _pool_rows(manifest: Manifest, config: RuntimeConfig) -> int:
    return pool_rows(manifest, config, _physical_memory())


def _open_core(root: Path, manifest: Manifest, config: RuntimeConfig, media_kv: Session, rows: int) -> DecoderCore:
    """The decoder core for the manifest's KV layout (``rows`` pool slots for the inplace one)."""
    entry = manifest.graphs["decoder"]
    # inplace layout: a decode step's shapes and buffer addresses are fixed per pool window (CUDA graphs apply)
    decoder = open_session(root / entry.file, config.backend, entry,
                           decode_graph=manifest.decoder.kv_layout == "inplace")
    context = context_of(manifest, config)
    layout = manifest.decoder.kv_layout
    if layout == "inplace":
        return InplaceCore(decoder, media_kv, manifest, slots=rows, max_context=context)
    if layout == "concat":
        # on a GPU backend the KV stays in two alternating device buffers while a decode batch lasts
        return ConcatCore(decoder, media_kv, manifest, max_context=context,
                          resident=config.backend.provider != "cpu", rows=rows)
    raise ValueError(f"manifest decoder.kv_layout {layout!r} is not one this runtime serves (inplace, concat)")


def _require_provider(backend: BackendConfig, manifest: Manifest) -> None:
    from runtime.backends.factory import require_backend
    from runtime.backends.providers import ProviderSettingsError

    try:
        require_backend(backend, manifest)
    except ProviderSettingsError as exc:
        raise SettingsError(str(exc)) from exc


def _stop_threads(encoder: BackgroundEncoder, batcher: Batcher) -> None:
    encoder.close()
    batcher.close()


class Runtime:
    """The serving engine. Thread-safe: the gRPC server calls it from a thread pool."""

    def __init__(self, root: Path, manifest: Manifest, config: RuntimeConfig) -> None:
        self.root = root
        self.manifest = manifest
        self.config = config
        backend = config.backend
        graphs = manifest.graphs
        _require_provider(backend, manifest)  # before anything loads: a GPU provider this machine lacks names what is missing
        self.sessions: dict[str, Session] = {}
        """Graph key -> its session (the providers each one runs on: ``providers()``)."""

        def session(key: str) -> Session:
            self.sessions[key] = open_session(root / graphs[key].file, backend, graphs[key])
            return self.sessions[key]

        self.tokenizer = Tokenizer.from_file(str(root / manifest.tokenizer))
        self.vision = VisionEncoder(session("vision"), manifest)
        media_kv = session("media_kv")  # one session: the core and the K/V store
        rows = _pool_rows(manifest, config)
        self.decoder = _open_core(root, manifest, config, media_kv, rows)
        self.sessions["decoder"] = self.decoder.session
        self._catalog = Catalog(root, manifest, state_dir=config.state_dir)
        cache_dir = config.latent_cache_dir or root / ".cache" / "latents"
        self.latents = LatentStore.open(cache_dir, self._catalog, self.vision, manifest, fill=False)
        kv = MediaKVEncoder(media_kv, manifest)
        self.media_kv = MediaKVStore.open(default_kv_dir(cache_dir), self.latents, kv, self._catalog, fill=False)
        self.media = MediaMemory(self.vision, kv, self.media_kv)
        stores: list[ItemStore] = [self.latents, self.media_kv]
        self.prefix_cache = PrefixCache(config.prefix_cache_bytes)
        self.batcher = Batcher(self.decoder, config.max_active, config.max_queued, rows=rows)
        self._vqgan = None
        self.codes = None
        if "vqgan_encoder" in graphs and "vqgan_decoder" in graphs:
            from runtime.vqgan import CodeEncoder, CodeStore, VQGANCodec, default_codes_dir

            self._vqgan = VQGANCodec(session("vqgan_encoder"), session("vqgan_decoder"), manifest)
            self.codes = CodeStore.open(default_codes_dir(cache_dir), self._catalog, CodeEncoder(self._vqgan), manifest,
                                        fingerprint=self._vqgan.fingerprint, fill=False)
            stores.append(self.codes)
        self.catalog_encoder = BackgroundEncoder(stores, busy=self.media.recently_used)
        # a process that exits without close() must not leave these threads inside onnxruntime at teardown
        # (the C++ runtime aborts): stop them at exit; close() does it first and detaches this
        self._exit_stop = weakref.finalize(self, _stop_threads, self.catalog_encoder, self.batcher)
        """Encodes the stores' pending catalog images while serving (see ``background_encode``)."""
        if config.background_encode:
            self.catalog_encoder.start()
        self._diffusion = None
        if "unet" in graphs:
            from runtime.diffusion.pipeline import DiffusionPipeline

            entries = {(root / g.file).resolve(): g for g in graphs.values()}

            def diffusion_session(p: Path) -> Session:
                entry = entries.get(Path(p).resolve())
                opened = open_session(p, backend, entry)
                self.sessions[next((k for k, g in graphs.items() if g is entry), Path(p).stem)] = opened
                return opened

            self._diffusion = DiffusionPipeline.from_artifacts(root, manifest, diffusion_session)
        log.info("execution providers: %s", ", ".join(f"{k}={v}" for k, v in self.providers().items()))
        t = manifest.tokens
        self._banned = np.array([t.image, t.answer, t.pad], np.int64)
        self.requests = 0
        self._semantic_trie: TokenTrie | None = None
        """Semantic-ID items: every table row spelled after the answer prefix (built once: the table never
        changes, catalog edits only move items between rows and change the masks applied to it)."""
        if self._catalog.semantic is not None:
            spellings = self._catalog.semantic.spellings(t)  # (N, 4) token ids
            self._semantic_trie = TokenTrie.from_sequences(spellings, t.eos, prefix=self.answer_prefix)
            self._semantic_trie.build_index()  # now, not in a request thread: later masked views only read it

    @classmethod
    def open(cls, artifacts: str | Path, config: RuntimeConfig | None = None) -> Runtime:
        root = Path(artifacts)
        manifest = load_manifest(root, verify=True)
        return cls(root, manifest, config or RuntimeConfig())

    def providers(self) -> dict[str, list[str]]:
        """Graph key -> the ONNX Runtime providers its session runs on, the one in use first."""
        return {key: list(s.providers) for key, s in self.sessions.items()}

    @property
    def max_context(self) -> int:
        """Longest sequence (prompt + generated) a request may reach."""
        return self.decoder.max_context

    @property
    def catalog(self) -> Catalog:
        return self._catalog

    def close(self) -> None:
        """Stop decoding and the background encoder, persist entries computed since start-up, close the catalog."""
        self._exit_stop.detach()
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
        return tuple(self.resolve_one(item, f"{name}[{k}]") for k, item in enumerate(items))

    def resolve_one(self, item: HistoryItem, path: str) -> ResolvedItem:
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

    def admit(self, cancel: CancelToken | None = None, rows: int = 1) -> AbstractContextManager[Generator]:
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

    def fit(self, build: Callable[[int], Prompt], history_len: int, blame: str) -> EncodedPrompt:
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


    def ban_special(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        scores = np.array(scores, copy=True)
        scores[..., self._banned] = -np.inf  # no new image, answer or pad token can be generated
        return scores

    # -- what tasks see (runtime.tasks.context.TaskContext) ---------------------------------------------
    @property
    def limits(self) -> Limits:
        return self.config.limits

    @property
    def semantic_trie(self) -> TokenTrie | None:
        """Semantic-ID items: every table row spelled after the answer prefix; None for atomic items."""
        return self._semantic_trie

    @cached_property
    def answer_prefix(self) -> tuple[int, ...]:
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

    # -- the tasks (runtime.tasks) ------------------------------------------------------------------------
    def recommend(self, request: RecommendRequest) -> RecommendResult:
        return recommend_task.recommend(self, request)

    def search(self, request: SearchRequest) -> RecommendResult:
        return recommend_task.search(self, request)

    def predict_preference(self, request: PreferenceRequest) -> PreferenceResult:
        """Rating only: the distribution over ``rate_1..rate_5`` from the prompt's prefill alone (see
        runtime.tasks.preference)."""
        return preference_task.predict_preference(self, request)

    def explain(self, request: PreferenceRequest) -> Iterator[TextPiece | PreferenceResult]:
        """Rating distribution, then ``rate_r`` and the explanation, streamed (see runtime.tasks.preference)."""
        return preference_task.explain(self, request)

    def select_items(self, request: SelectRequest) -> SelectResult:
        return selection_task.select_items(self, request)

    # -- image generation -------------------------------------------------------------------------------
    def generate_image(self, request: ImageRequest) -> Iterator[ImageProgress | ImageResult]:
        """``request.model`` picks the path (runtime.tasks.image.choose_image_model): VQGAN codes or diffusion."""
        from runtime.tasks.image import choose_image_model, generate_image, generate_image_codes

        model = choose_image_model(request.model, self._vqgan is not None, self._diffusion is not None)
        if model == ImageModel.VQGAN:
            assert self._vqgan is not None
            yield from generate_image_codes(self, self._vqgan, request)
            return
        assert self._diffusion is not None
        yield from generate_image(self, self._diffusion, request)
