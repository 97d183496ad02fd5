"""``TaskContext``: what a task module needs of the engine (``runtime.engine.Runtime`` implements it)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer

from runtime.catalog import Catalog
from runtime.decoder.generator import Generator
from runtime.decoding.trie import TokenTrie
from runtime.limits import Limits
from runtime.manifest import Manifest
from runtime.prompts import EncodedPrompt, Prompt, ResolvedItem
from runtime.types import CancelToken, HistoryItem


class Prefilled(Protocol):
    """A prompt's prefill (runtime.engine.Prefilled)."""

    @property
    def logits(self) -> np.ndarray:
        """(V,) logits of the prompt's last position."""
        ...

    @property
    def prompt(self) -> Prompt: ...
    @property
    def vision_s(self) -> float: ...
    @property
    def prefill_s(self) -> float: ...
    @property
    def hit(self) -> bool: ...


class TaskContext(Protocol):
    """The stages a task composes: resolving history against the catalog, fitting a prompt to the
    context, prefill through the prefix cache (optionally into a decode ``Generator``), and admission."""

    manifest: Manifest
    tokenizer: Tokenizer
    codes: Any
    """The VQGAN codes store of the catalog (runtime.vqgan.CodeStore), or None."""
    requests: int
    """Model requests served (tasks count theirs)."""

    @property
    def max_context(self) -> int: ...
    @property
    def limits(self) -> Limits: ...
    @property
    def catalog(self) -> Catalog: ...
    @property
    def semantic_trie(self) -> TokenTrie | None: ...
    @property
    def answer_prefix(self) -> tuple[int, ...]: ...

    def resolve(self, items: tuple[HistoryItem, ...], name: str = "history") -> tuple[ResolvedItem, ...]: ...

    def resolve_one(self, item: HistoryItem, path: str) -> ResolvedItem: ...

    def fit(self, build: Callable[[int], Prompt], history_len: int, blame: str) -> EncodedPrompt:
        """The prompt with the most recent history items that fits the context (see Runtime.fit)."""
        ...

    def admit(self, cancel: CancelToken | None = None, rows: int = 1) -> AbstractContextManager[Generator]: ...

    def prefill(self, prompt: Prompt | EncodedPrompt, tenant: str, cancel: CancelToken | None, user_id: str = "",
                generator: Generator | None = None) -> Prefilled: ...

    def ban_special(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray: ...
