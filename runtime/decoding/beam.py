"""Paper-parity beam search in numpy, with the semantics of Hugging Face transformers' beam search.

The reference UniMP evaluation decodes with ``generate(num_beams=..., num_return_sequences=...)``; this
module reproduces that algorithm step for step (same candidate pool, same stopping rules, same length
penalty, same ``sequences_scores``) without knowing how logits are produced.

The model is driven through one callback (the caller prefilled the prompt once, in one KV row)::

    advance(parent_rows, tokens) -> logits
        parent_rows: int64 [n]  row i of the new batch continues row parent_rows[i] of the previous batch
        tokens:      int64 [n]  the token appended to row i
        logits:      float [n, V]  next-token logits of every new row

At the first call the previous batch is the single prompt row, so every parent is 0 (the beams fork from
the prompt); afterwards the previous batch is the ``num_beams`` rows returned by the last call. The caller
gathers (reorders / duplicates) its KV rows by ``parent_rows`` and then appends ``tokens``. ``advance`` is
never called after the search has decided to stop, so a search of ``t`` steps makes ``t - 1`` calls.

Arithmetic is float32 like the reference, including its ``-1e9`` sentinel scores, so that ties and
near-ties resolve the same way. Ties in top-k are broken towards the lower flat index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

from runtime.types import Cancelled

log = logging.getLogger(__name__)

AdvanceFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(parent_rows int64 [n], tokens int64 [n]) -> logits [n, V]; see the module docstring."""
LogitsProcessor = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(input_ids int64 [n, t], scores float32 [n, V]) -> scores [n, V]; applied to log-probabilities."""
AllowedTokensFn = Callable[[np.ndarray], "Sequence[int] | np.ndarray"]
"""(generated prefix int64 [t]) -> ids allowed next; every other id gets -inf."""

EarlyStopping = bool | Literal["never"]

_NEG = np.float32(-1.0e9)
"""The reference's sentinel for "not a candidate" (finite, unlike -inf)."""


class CancelLike(Protocol):
    @property
    def cancelled(self) -> bool: ...


@dataclass(frozen=True)
class BeamSearchConfig:
    """Beam search settings; names and defaults follow ``transformers.GenerationConfig``."""

    num_beams: int = 10
    """With 1 the algorithm still runs, but the reference dispatches ``num_beams=1`` to greedy search
    (``sampling.TokenGenerator`` with temperature 0) and reports no sequence scores."""
    num_return_sequences: int = 1
    """At most ``num_beams``; hypotheses are returned best first."""
    max_new_tokens: int = 50
    length_penalty: float = 1.0
    """Finished hypotheses score ``sum(logprobs) / length ** length_penalty`` (length = generated tokens)."""
    early_stopping: EarlyStopping = False
    """True: stop as soon as ``num_beams`` hypotheses are finished. False: stop when the best running
    beam, scored at its current length, cannot beat the worst finished one. "never": like False, but
    with a positive length penalty the running beam is scored at ``max_new_tokens`` (canonical search)."""
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    """Only used to pad returned sequences (the reference pads with pad, or with EOS when pad is 0 or unset)."""

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(
                f"num_return_sequences must be in [1, num_beams={self.num_beams}], got {self.num_return_sequences}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")

    @property
    def eos_ids(self) -> np.ndarray:
        """int64 [n_eos] (possibly empty)."""
        if self.eos_token_id is None:
            return np.zeros(0, dtype=np.int64)
        if isinstance(self.eos_token_id, int):
            return np.array([self.eos_token_id], dtype=np.int64)
        return np.asarray(self.eos_token_id, dtype=np.int64)

    @property
    def fill_token_id(self) -> int:
        """Padding value of returned sequences, the reference's ``pad or eos[0] if eos is not None else -1``."""
        eos = self.eos_ids
        if self.eos_token_id is None or eos.size == 0:
            return -1
        return int(self.pad_token_id) if self.pad_token_id else int(eos[0])


@dataclass(frozen=True)
class BeamResult:
    """Finished hypotheses, best first."""

    tokens: np.ndarray
    """int64 [R, L]: generated tokens (no prompt), padded with ``fill_token_id`` to the longest one; the
    same layout as the reference's ``sequences[:, prompt_len:]``."""
    scores: np.ndarray
    """float32 [R]: length-penalised sequence scores (the reference's ``sequences_scores``). Slots that
    never received a finished hypothesis keep the sentinel -1e9 and an empty sequence."""
    lengths: np.ndarray
    """int64 [R]: generated tokens of each hypothesis, its EOS included."""
    steps: int
    """Decoding steps run (``advance`` was called ``steps - 1`` times)."""

    def sequences(self) -> list[np.ndarray]:
        """Each hypothesis's generated tokens without padding, int64 [lengths[i]]."""
        return [self.tokens[i, : int(n)] for i, n in enumerate(self.lengths)]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float32 log-softmax over the last axis (float32 like the reference)."""
    x = np.asarray(logits, dtype=np.float32)
    peak = np.max(x, axis=-1, keepdims=True)
    peak = np.where(np.isfinite(peak), peak, np.float32(0.0))
    shifted = x - peak
    with np.errstate(divide="ignore"):
        lse = np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return (shifted - lse).astype(np.float32, copy=False)


def topk_desc(values: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of a 1-D array, descending; ties go to the lower index."""
    n = values.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k < n:
        part = np.argpartition(-values, k - 1)[:k]
        threshold = values[part].min()
        above = np.flatnonzero(values > threshold)
        tied = np.flatnonzero(values == threshold)[: k - above.size]
        idx = np.concatenate([above, tied])
    else:
        idx = np.arange(n)
    order = np.lexsort((idx, -values[idx]))
    return idx[order].astype(np.int64)


def _allowed_mask(
    allowed_tokens: AllowedTokensFn, prefixes: np.ndarray, live: np.ndarray, vocab: int
) -> np.ndarray:
    """Additive mask float32 [n, V]: 0 where allowed, -inf elsewhere; dead rows (``live`` False) all -inf."""
    mask = np.full((prefixes.shape[0], vocab), -np.inf, dtype=np.float32)
    for row in range(prefixes.shape[0]):
        if not live[row]:
            continue
        allowed = np.asarray(allowed_tokens(prefixes[row]), dtype=np.int64)
        if allowed.size == 0:
            raise ValueError(
                f"allowed_tokens returned no token for the prefix {prefixes[row].tolist()}: the constraint is unsatisfiable"
            )
        mask[row, allowed] = 0.0
    return mask


def beam_search(
    prompt_logits: np.ndarray,
    advance: AdvanceFn,
    config: BeamSearchConfig,
    *,
    logits_processor: LogitsProcessor | None = None,
    allowed_tokens: AllowedTokensFn | None = None,
    prompt_ids: np.ndarray | None = None,
    cancel: CancelLike | None = None,
) -> BeamResult:
    """Beam search from the prompt's last-position logits (float [V]).

    ``allowed_tokens`` (like the reference's ``prefix_allowed_tokens_fn``) receives the tokens generated so
    far and returns the ids allowed next; it is applied to log-probabilities before ``logits_processor``,
    as in the reference. ``logits_processor`` receives ``input_ids`` int64 [n, t] (the prompt, if
    ``prompt_ids`` is given, followed by the generated tokens) and the log-probabilities float32 [n, V].
    ``cancel.cancelled`` is checked before every ``advance`` call; when set, ``Cancelled`` is raised.
    """
    first = np.asarray(prompt_logits, dtype=np.float32)
    if first.ndim == 2 and first.shape[0] == 1:
        first = first[0]
    if first.ndim != 1:
        raise ValueError(f"prompt_logits must have shape [V], got {first.shape}")
    vocab = first.shape[0]
    nb = config.num_beams
    max_new = config.max_new_tokens
    eos = config.eos_ids
    lp = config.length_penalty
    keep = max(2, 1 + eos.size) * nb  # candidates kept per step, so that nb can go on after EOS hits
    if keep > nb * vocab:
        raise ValueError(f"vocabulary of {vocab} is too small for {nb} beams")
    fill = config.fill_token_id
    prompt = None if prompt_ids is None else np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)

    # running beams
    run_tokens = np.full((nb, max_new), fill, dtype=np.int64)  # [nb, max_new]
    run_scores = np.full(nb, _NEG, dtype=np.float32)  # [nb]; only the first copy of the prompt is live
    run_scores[0] = 0.0
    # finished hypotheses
    fin_tokens = np.full((nb, max_new), fill, dtype=np.int64)  # [nb, max_new]
    fin_scores = np.full(nb, _NEG, dtype=np.float32)  # [nb]
    fin_lengths = np.zeros(nb, dtype=np.int64)  # [nb]
    fin_done = np.zeros(nb, dtype=bool)  # [nb]
    can_improve = True

    logits = np.broadcast_to(first, (nb, vocab))  # [nb, V]: nb copies of the prompt row
    step = 0
    for step in range(1, max_new + 1):
        done = step - 1  # tokens generated before this step
        logprobs = log_softmax(logits)  # [nb, V]
        if allowed_tokens is not None:
            if step == 1:  # every row is the prompt: ask once
                mask = np.broadcast_to(
                    _allowed_mask(allowed_tokens, run_tokens[:1, :0], np.ones(1, dtype=bool), vocab),
                    (nb, vocab),
                )
            else:
                mask = _allowed_mask(allowed_tokens, run_tokens[:, :done], np.isfinite(run_scores), vocab)
            constrained = logprobs + mask
            if np.all(np.isneginf(constrained.max(axis=-1))):
                constrained = np.array(mask, dtype=np.float32)  # the reference forces the allowed ids then
            logprobs = constrained
        if logits_processor is not None:
            ids = run_tokens[:, :done]
            if prompt is not None:
                ids = np.concatenate([np.repeat(prompt, nb, axis=0), ids], axis=1)
            logprobs = np.asarray(logits_processor(ids, np.array(logprobs)), dtype=np.float32)

        # candidates: the best `keep` (beam, token) continuations over all beams
        total = (logprobs + run_scores[:, None]).reshape(-1)  # [nb * V]
        flat = topk_desc(total, keep)  # [keep]
        cand_scores = total[flat]  # [keep] float32
        cand_parent = flat // vocab  # [keep]
        cand_token = flat % vocab  # [keep]
        cand_tokens = run_tokens[cand_parent]  # [keep, max_new] (a copy)
        cand_tokens[:, done] = cand_token
        hits = np.isin(cand_token, eos) | (step >= max_new)  # [keep]: finished by EOS or by length

        # next running beams: the best candidates that did not finish
        running_pool = cand_scores + np.where(hits, _NEG, np.float32(0.0))  # [keep]
        pick = topk_desc(running_pool, nb)  # [nb]
        next_tokens = cand_tokens[pick]
        next_scores = running_pool[pick]
        next_parents = cand_parent[pick]

        # finished hypotheses: only the top nb candidates may enter, with the length penalty
        just_finished = hits.copy()
        just_finished[nb:] = False
        penalised = cand_scores / np.float32(float(step) ** lp)
        if config.early_stopping is True and fin_done.all():
            penalised = penalised + _NEG
        if not can_improve:
            penalised = penalised + _NEG
        penalised = penalised + np.where(just_finished, np.float32(0.0), _NEG)
        merged_scores = np.concatenate([fin_scores, penalised])  # [nb + keep]
        best = topk_desc(merged_scores, nb)  # [nb]
        fin_tokens = np.concatenate([fin_tokens, cand_tokens])[best]
        fin_scores = merged_scores[best]
        fin_lengths = np.concatenate([fin_lengths, np.full(keep, step, dtype=np.int64)])[best]
        fin_done = np.concatenate([fin_done, just_finished])[best]

        run_tokens, run_scores = next_tokens, next_scores

        # can the best running beam still beat the worst finished hypothesis?
        if config.early_stopping == "never" and lp > 0.0:
            hypothetical = max_new
        else:
            hypothetical = step
        best_running = run_scores[0] / np.float32(float(hypothetical) ** lp)
        worst_finished = np.where(fin_done, fin_scores.min(), _NEG)
        can_improve = can_improve and bool(np.any(best_running > worst_finished))

        all_finished = bool(fin_done.all()) and config.early_stopping is True
        if not can_improve or all_finished or bool(hits.all()):
            break
        if cancel is not None and cancel.cancelled:
            raise Cancelled("beam search cancelled")
        parents = next_parents if step > 1 else np.zeros(nb, dtype=np.int64)
        logits = np.asarray(advance(parents, run_tokens[:, done].copy()))
        if logits.shape != (nb, vocab):
            raise ValueError(f"advance returned logits of shape {logits.shape}, expected {(nb, vocab)}")

    count = config.num_return_sequences
    lengths = fin_lengths[:count]
    width = int(lengths.max()) if count else 0
    log.debug("beam search: %d steps, best score %.4f", step, float(fin_scores[0]))
    return BeamResult(
        tokens=fin_tokens[:count, :width].copy(),
        scores=fin_scores[:count].copy(),
        lengths=lengths.copy(),
        steps=step,
    )
