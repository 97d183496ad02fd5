"""``TaskContext``: what a task module needs of the engine (``runtime.engine.Runtime`` implements it)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer

from runtime.decoder.generator import Generator
from runtime.manifest import Manifest
from runtime.prompts import EncodedPrompt, Prompt, ResolvedItem
from runtime.types import CancelToken, HistoryItem


class Prefilled(Protocol):
    @property
    def logits(self) -> np.ndarray: ...
    @property
    def vision_s(self) -> float: ...
    @property
    def prefill_s(self) -> float: ...


class TaskContext(Protocol):
    manifest: Manifest
    tokenizer: Tokenizer
    codes: Any
    """The VQGAN codes store of the catalog (runtime.vqgan.CodeStore), or None."""

    @property
    def max_context(self) -> int: ...

    def resolve(self, items: tuple[HistoryItem, ...], name: str = "history") -> tuple[ResolvedItem, ...]: ...

    def admit(self, cancel: CancelToken | None = None, rows: int = 1) -> AbstractContextManager[Generator]: ...

    def prefill(self, prompt: Prompt | EncodedPrompt, tenant: str, cancel: CancelToken | None, user_id: str = "",
                generator: Generator | None = None) -> Prefilled: ...

    def ban_special(self, ids: np.ndarray, scores: np.ndarray) -> np.ndarray: ...
