"""Greedy, temperature and nucleus (top-p) decoding of one sequence, one token at a time.

``TokenGenerator`` is the step-wise loop a gRPC stream iterates. It never sees the model: it starts from
the prompt's last-position logits (the caller prefilled the prompt) and asks for more through::

    advance(tokens) -> logits
        tokens: int64 [1]  the token just chosen, to append to the caller's single KV row
        logits: float [V] or [1, V]  the next-token logits after it

``advance`` is called lazily, at the start of the step that needs it, so a token is handed out before
the model runs on it, no model call follows the last token, and a cancelled request stops before it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

log = logging.getLogger(__name__)

FinishReason = Literal["eos", "length", "cancelled"]
SampleAdvanceFn = Callable[[np.ndarray], np.ndarray]
"""(tokens int64 [1]) -> logits [V] or [1, V]."""
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(input_ids int64 [1, t] generated so far, logits float32 [1, V]) -> logits [1, V]; runs before
temperature and top-p."""


class CancelLike(Protocol):
    @property
    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    """0 means greedy (argmax, ties to the lowest id); otherwise logits are divided by it."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]: sample from the smallest set of most likely tokens whose probability
    reaches it. 1 keeps the whole vocabulary. Ignored when greedy."""
    seed: int = 0
    """Seed of the numpy Generator: equal seeds and logits give equal tokens."""
    max_new_tokens: int = 64
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0.0 or not np.isfinite(self.temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def eos_ids(self) -> frozenset[int]:
        if self.eos_token_id is None:
            return frozenset()
        if isinstance(self.eos_token_id, int):
            return frozenset((self.eos_token_id,))
        return frozenset(int(t) for t in self.eos_token_id)


def greedy_token(logits: np.ndarray) -> int:
    """Argmax of logits [V]; ties go to the lowest id."""
    return int(np.argmax(np.asarray(logits).reshape(-1)))


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Logits [V] with every token outside the nucleus set to -inf (a new float64 array).

    A token is kept when the probability mass of the tokens strictly more likely than it (ties ordered by
    id) is below ``top_p``; so the most likely token is always kept.
    """
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    if top_p >= 1.0:
        return x.copy()
    probs = _softmax(x)
    order = np.argsort(-probs, kind="stable")  # [V], most likely first
    before = np.cumsum(probs[order]) - probs[order]  # mass strictly ahead of each token
    keep = np.zeros(x.shape[0], dtype=bool)
    keep[order[before < top_p]] = True
    keep[order[0]] = True
    return np.where(keep, x, -np.inf)


def sample_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    """Draw one token from logits [V] with temperature and top-p; greedy when ``temperature`` is 0.

    Consumes exactly one ``rng.random()`` per sampled token.
    """
    if temperature == 0.0:
        return greedy_token(logits)
    scaled = np.asarray(logits, dtype=np.float64).reshape(-1) / temperature
    probs = _softmax(top_p_filter(scaled, top_p))  # [V], zero outside the nucleus
    cdf = np.cumsum(probs)
    index = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    index = min(index, probs.shape[0] - 1)
    while probs[index] == 0.0 and index > 0:  # never land on a filtered token through rounding
        index -= 1
    return index


def _softmax(x: np.ndarray) -> np.ndarray:
    peak = np.max(x)
    e = np.exp(x - peak)
    return e / e.sum()


class TokenGenerator:
    """Step-wise decoding of one sequence: ``step()`` returns the next token until ``is_done()``.

    Iterating yields the tokens; the EOS token, when reached, is yielded (and kept in ``tokens``) like
    the reference includes it in its output. ``finish_reason`` is "eos", "length" or "cancelled" once done.
    """

    def __init__(
        self,
        prompt_logits: np.ndarray,
        advance: SampleAdvanceFn,
        config: SamplingConfig,
        *,
        cancel: CancelLike | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> None:
        first = np.asarray(prompt_logits)
        if first.ndim == 2 and first.shape[0] == 1:
            first = first[0]
        if first.ndim != 1:
            raise ValueError(f"prompt_logits must have shape [V], got {first.shape}")
        self._logits: np.ndarray | None = first  # [V] logits for the next token, None until advanced
        self._vocab = first.shape[0]
        self._advance = advance
        self.config = config
        self._cancel = cancel
        self._processor = logits_processor
        self._rng = np.random.default_rng(config.seed)
        self._eos = config.eos_ids
        self._tokens: list[int] = []
        self._finish: FinishReason | None = None

    @property
    def tokens(self) -> tuple[int, ...]:
        """Tokens generated so far (a copy)."""
        return tuple(self._tokens)

    @property
    def finish_reason(self) -> FinishReason | None:
        return self._finish

    def is_done(self) -> bool:
        return self._finish is not None

    def cancel(self) -> None:
        """Stop before the next model call."""
        if self._finish is None:
            self._finish = "cancelled"

    def step(self) -> int | None:
        """Choose, record and return the next token; None (and finish_reason "cancelled") if cancelled.

        Raises ValueError when called after the generator is done.
        """
        if self._finish is not None:
            raise ValueError(f"generation already finished ({self._finish})")
        if self._cancel is not None and self._cancel.cancelled:
            self._finish = "cancelled"
            return None
        if self._logits is None:
            out = np.asarray(self._advance(np.array([self._tokens[-1]], dtype=np.int64)))
            if out.size != self._vocab:
                raise ValueError(f"advance returned logits of shape {out.shape}, expected [{self._vocab}]")
            self._logits = out.reshape(-1)
        logits = self._logits
        if self._processor is not None:
            ids = np.array([self._tokens], dtype=np.int64).reshape(1, -1)  # [1, t]
            scores = np.asarray(logits, dtype=np.float32).reshape(1, -1)  # [1, V]
            logits = np.asarray(self._processor(ids, scores)).reshape(-1)
        token = sample_token(logits, self.config.temperature, self.config.top_p, self._rng)
        self._tokens.append(token)
        self._logits = None
        if token in self._eos:
            self._finish = "eos"
        elif len(self._tokens) >= self.config.max_new_tokens:
            self._finish = "length"
        if self._finish is not None:
            log.debug("generation finished: %s after %d tokens", self._finish, len(self._tokens))
        return token

    def __iter__(self) -> Iterator[int]:
        while not self.is_done():
            token = self.step()
            if token is not None:
                yield token
