"""Incremental detokenization for streamed text.

Byte-level BPE can split one UTF-8 character across tokens, so decoding each token alone yields U+FFFD
replacement characters. ``IncrementalDetokenizer`` decodes a short window of recent tokens and holds text
back while it ends in an incomplete character, so that:

- no piece ever contains a replacement character that the full decode would not contain at that place;
- the concatenation of all pieces (``push`` results, then ``flush``) equals
  ``tokenizer.decode(all_ids, skip_special_tokens=...)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from tokenizers import Tokenizer

log = logging.getLogger(__name__)

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces. Not thread-safe: one per stream."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        """Start of the decode window: the window's first tokens were already emitted (context for
        decoders whose output depends on the previous token)."""
        self._read_offset = 0
        """Tokens before this index have been emitted."""
        self._emitted: list[str] = []

    @property
    def ids(self) -> tuple[int, ...]:
        return tuple(self._ids)

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._emitted)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly complete text (often "", e.g. mid-character)."""
        self._ids.append(int(token_id))
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if window_text.endswith(_REPLACEMENT) or len(window_text) <= len(prefix_text):
            return ""  # an incomplete character (or nothing new) so far: wait for more bytes
        if window_text.startswith(prefix_text):
            piece = window_text[len(prefix_text) :]
        else:  # a decoder whose output is not prefix-stable over the window: diff the full decode
            piece = self._full_diff()
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if piece:
            self._emitted.append(piece)
        return piece

    def extend(self, token_ids: Iterable[int]) -> str:
        """Push several tokens; return the concatenated pieces."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: return whatever the full decode has beyond the emitted text (for example a
        trailing incomplete character, decoded as the full decode would, with U+FFFD)."""
        piece = self._full_diff()
        self._prefix_offset = self._read_offset = len(self._ids)
        if piece:
            self._emitted.append(piece)
        return piece

    def _full_diff(self) -> str:
        full = self._decode(self._ids)
        emitted = self.text
        if full.startswith(emitted):
            return full[len(emitted) :]
        log.warning("incremental detokenization diverged from the full decode; emitted text kept as is")
        return ""


class StrippedPieces:
    """Re-cuts a stream of text pieces so that their concatenation is the full text ``.strip()``-ed.

    Leading whitespace is dropped; whitespace at the current end is held back until more text follows,
    and dropped at the end of the stream. Streamed explanations use it so that the pieces a client joins
    equal the final message's text exactly. Not thread-safe: one per stream.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""
        """Trailing whitespace not emitted yet."""
        self._emitted: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far (the stripped text, once the stream has ended)."""
        return "".join(self._emitted)

    def push(self, piece: str) -> str:
        """Add the next piece; return the text to emit now (possibly "")."""
        if not self._started:
            piece = piece.lstrip()
            if not piece:
                return ""
            self._started = True
        body = piece.rstrip()
        if not body:
            self._held += piece
            return ""
        out = self._held + body
        self._held = piece[len(body) :]
        self._emitted.append(out)
        return out
