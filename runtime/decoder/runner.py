"""Prefill and decode calls on the exported decoder graphs (names read from the manifest)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.backends.base import Session
from runtime.decoder.kv_cache import PrefixEntry, RowState, left_pad
from runtime.manifest import Manifest

Memory = list[tuple[np.ndarray, np.ndarray]]
"""Per cross-attention block K, V: (images, h, num_latents, dh)."""


@dataclass(frozen=True)
class PrefillRow:
    """One prompt to prefill: token ids and the cross-attention memory of its images, in prompt order."""

    ids: np.ndarray
    """(T,) int64."""
    memory: Memory
    """Per block K, V (M, h, n, dh); M may be 0."""


class DecoderRunner:
    def __init__(self, decoder: Session, media_kv: Session, manifest: Manifest) -> None:
        self.decoder = decoder
        self.media_kv_session = media_kv
        self.m = manifest
        d, n = manifest.decoder, manifest.names
        self.layers = d.num_layers
        self.blocks = len(d.xattn_layers)
        self.heads, self.head_dim = d.num_heads, d.head_dim
        self.x_heads, self.x_dim = d.xattn_heads, d.xattn_head_dim
        self.n_latents = manifest.vision.num_latents
        self.image_id = manifest.tokens.image
        self.pad_id = manifest.tokens.pad
        self.past_names = [(n.past_key.format(layer=i), n.past_value.format(layer=i)) for i in range(self.layers)]
        self.present_names = [(n.present_key.format(layer=i), n.present_value.format(layer=i)) for i in range(self.layers)]
        self.memory_names = [(n.xattn_key.format(block=j), n.xattn_value.format(block=j)) for j in range(self.blocks)]
        self.output_names = [n.logits] + [name for pair in self.present_names for name in pair]
        self.calls = 0

    # -- media ------------------------------------------------------------------------------------------
    def media_kv(self, latents: np.ndarray) -> Memory:
        """(N, n, Dv) media latents -> per block K, V (N, h, n, dh). Once per image, never per step or beam."""
        if latents.shape[0] == 0:
            z = np.zeros((0, self.x_heads, self.n_latents, self.x_dim), np.float32)
            return [(z, z) for _ in range(self.blocks)]
        out = self.media_kv_session.run({self.m.names.media_latents: np.ascontiguousarray(latents, np.float32)})
        return [(out[k], out[v]) for k, v in self.memory_names]

    def batch_memory(self, rows: list[Memory]) -> list[tuple[np.ndarray, np.ndarray]]:  # both layouts' prefill
        """Per row (M_b, h, n, dh) -> batched (B, h, max(M)*n, dh), zero images padding the short rows."""
        m = max(1, max(mem[0][0].shape[0] for mem in rows)) if self.blocks else 1
        out = []
        for j in range(self.blocks):
            ks, vs = [], []
            for mem in rows:
                k, v = mem[j]
                pad = m - k.shape[0]
                if pad:
                    k = np.concatenate([k, np.zeros((pad, *k.shape[1:]), np.float32)])
                    v = np.concatenate([v, np.zeros((pad, *v.shape[1:]), np.float32)])
                # (M, h, n, dh) -> (h, M*n, dh): image i's latents occupy keys [i*n, (i+1)*n)
                ks.append(k.transpose(1, 0, 2, 3).reshape(self.x_heads, m * self.n_latents, self.x_dim))
                vs.append(v.transpose(1, 0, 2, 3).reshape(self.x_heads, m * self.n_latents, self.x_dim))
            out.append((np.stack(ks), np.stack(vs)))
        return out

    def _last_image(self, mem: Memory) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """The last image's K, V per block as (1, h, n, dh), and 1 if the row has an image (else zeros, 0)."""
        out = []
        has = int(mem[0][0].shape[0] > 0) if self.blocks else 0
        for k, v in mem:
            if has:
                out.append((k[-1:], v[-1:]))
            else:
                z = np.zeros((1, self.x_heads, self.n_latents, self.x_dim), np.float32)
                out.append((z, z))
        return out, has

    # -- prefill ----------------------------------------------------------------------------------------
    def prefill(self, rows: list[PrefillRow]) -> tuple[np.ndarray, RowState]:
        """Left-padded batch prefill from an empty cache. Returns last-position logits (B, V) and the state."""
        b = len(rows)
        t = max(len(r.ids) for r in rows)
        ids = np.full((b, t), self.pad_id, np.int64)
        mask = np.zeros((b, t), np.int64)
        for i, r in enumerate(rows):
            ids[i, t - len(r.ids) :] = r.ids
            mask[i, t - len(r.ids) :] = 1
        positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        text_time = np.cumsum(ids == self.image_id, axis=1).astype(np.int64)
        empty = np.zeros((b, self.heads, 0, self.head_dim), np.float32)
        feeds = self._feeds(ids, positions, mask, text_time, [empty] * self.layers, [empty] * self.layers,
                            self.batch_memory([r.memory for r in rows]))
        logits, keys, values = self._run(feeds)
        last = [self._last_image(r.memory) for r in rows]
        state = RowState(
            keys=keys,
            values=values,
            mask=mask,
            next_pos=mask.sum(axis=1).astype(np.int64),
            memory=[(np.concatenate([m[0][j][0] for m in last]), np.concatenate([m[0][j][1] for m in last]))
                    for j in range(self.blocks)],
            has_image=np.array([m[1] for m in last], np.int64),
        )
        return logits, state

    def prefill_with_prefix(self, prefix: PrefixEntry, suffix: np.ndarray, memory: Memory) -> tuple[np.ndarray, RowState]:
        """One row: the cached prefix KV as past, then the suffix tokens. ``memory`` holds ALL the prompt's images."""
        t = len(suffix)
        p = prefix.length
        ids = suffix[None].astype(np.int64)
        mask = np.ones((1, p + t), np.int64)
        positions = (np.arange(t, dtype=np.int64) + p)[None]
        text_time = (prefix.images + np.cumsum(suffix == self.image_id))[None].astype(np.int64)
        feeds = self._feeds(ids, positions, mask, text_time, list(prefix.keys), list(prefix.values),
                            self.batch_memory([memory]))
        logits, keys, values = self._run(feeds)
        last, has = self._last_image(memory)
        state = RowState(keys, values, mask, np.array([p + t], np.int64),
                         [(k, v) for k, v in last], np.array([has], np.int64))
        return logits, state

    # -- decode -----------------------------------------------------------------------------------------
    def step(self, states: list[RowState], tokens: list[np.ndarray]) -> tuple[list[np.ndarray], list[RowState]]:
        """Advance every row of every state by one token in ONE decoder call.

        States may have different past lengths (left-padded to the longest) and image counts (each row sees
        its own last image). Returns per state the logits (n_i, V) and the advanced state.
        """
        length = max(s.length for s in states)
        feeds, mask = self.step_feeds(states, tokens)
        logits, new_keys, new_values = self._run(feeds)
        return self.split(states, length, logits, mask, new_keys, new_values)

    def step_feeds(self, states: list[RowState], tokens: list[np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A decode step's host feeds over ``states`` left-padded to the longest, and its (B, L+1) mask."""
        length = max(s.length for s in states)
        past_mask = _batched([left_pad(s.mask, length, 1) for s in states])
        b = past_mask.shape[0]
        mask = np.concatenate([past_mask, np.ones((b, 1), np.int64)], axis=1)
        ids = _batched([np.asarray(t, np.int64).reshape(-1) for t in tokens])[:, None]
        positions = _batched([s.next_pos for s in states])[:, None]
        text_time = _batched([s.has_image for s in states])[:, None]
        memory = [
            (_batched([s.memory[j][0] for s in states]), _batched([s.memory[j][1] for s in states]))
            for j in range(self.blocks)
        ]
        keys = [_batched([left_pad(s.keys[i], length, 2) for s in states]) for i in range(self.layers)]
        values = [_batched([left_pad(s.values[i], length, 2) for s in states]) for i in range(self.layers)]
        return self._feeds(ids, positions, mask, text_time, keys, values, memory), mask

    def split(self, states: list[RowState], length: int, logits: np.ndarray, mask: np.ndarray,
              new_keys: list[np.ndarray], new_values: list[np.ndarray]) -> tuple[list[np.ndarray], list[RowState]]:
        """A step's batched outputs (padded to ``length`` + 1) back into one advanced state per input state."""
        out_logits, out_states = [], []
        start = 0
        for s in states:
            stop = start + s.rows
            # drop the left padding this call added for shorter states: their own length grows by one
            cut = length - s.length
            out_logits.append(logits[start:stop])
            out_states.append(
                RowState(
                    keys=[k[start:stop, :, cut:] for k in new_keys],
                    values=[v[start:stop, :, cut:] for v in new_values],
                    mask=mask[start:stop, cut:],
                    next_pos=s.next_pos + 1,
                    memory=s.memory,
                    has_image=s.has_image,
                )
            )
            start = stop
        return out_logits, out_states

    # -- plumbing ---------------------------------------------------------------------------------------
    def _feeds(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        mask: np.ndarray,
        text_time: np.ndarray,
        keys: list[np.ndarray],
        values: list[np.ndarray],
        memory: list[tuple[np.ndarray, np.ndarray]],
    ) -> dict[str, np.ndarray]:
        n = self.m.names
        feeds = {n.input_ids: ids, n.position_ids: positions, n.attention_mask: mask, n.text_time: text_time}
        for (kn, vn), k, v in zip(self.past_names, keys, values):
            feeds[kn] = np.ascontiguousarray(k, np.float32)
            feeds[vn] = np.ascontiguousarray(v, np.float32)
        for (kn, vn), (k, v) in zip(self.memory_names, memory):
            feeds[kn] = np.ascontiguousarray(k, np.float32)
            feeds[vn] = np.ascontiguousarray(v, np.float32)
        return feeds

    def _run(self, feeds: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        self.calls += 1
        out = self.decoder.run(feeds, self.output_names)
        logits = out[self.m.names.logits]
        keys = [out[k] for k, _ in self.present_names]
        values = [out[v] for _, v in self.present_names]
        return logits, keys, values


def _batched(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)  # one state: no copy


def prefix_entry(state: RowState, row: int, length: int, images: int) -> PrefixEntry:
    """The first ``length`` unpadded positions of ``row`` as a cacheable prefix (copies, owned by the cache)."""
    pad = int(state.length - state.mask[row].sum())
    sl = slice(pad, pad + length)
    keys = tuple(np.ascontiguousarray(k[row : row + 1, :, sl]) for k in state.keys)
    values = tuple(np.ascontiguousarray(v[row : row + 1, :, sl]) for v in state.values)
    for arr in (*keys, *values):
        arr.setflags(write=False)
    return PrefixEntry(keys, values, length, images)
