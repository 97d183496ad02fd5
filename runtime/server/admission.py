"""Admission control: which RPCs may start now, and what each one holds while it runs.

Two kinds of work are bounded separately, so one kind can never starve the other:

- **cheap** RPCs (``CHEAP_RPCS``: catalog reads and writes, RecordInteraction) touch only the catalog
  and the store. They never take a model slot; at most ``max_inflight_cheap`` run at once.
- **model** RPCs (everything else) take one of ``max_inflight`` slots and also hold their **cost**
  (``request_cost``), in decode row-steps, against the ``max_inflight_cost`` budget: Explain costs
  ``num_beams x max_new_tokens``, Recommend and Search in a beam mode ``num_beams x max_new_tokens``,
  GenerateImage its denoising ``steps`` (256, its code tokens, with ``image_model`` VQGAN), and anything
  else 1. A request whose cost does not fit in what
  is left of the budget is refused with RESOURCE_EXHAUSTED, except when no other model request holds
  any budget: a single request larger than the budget still runs, alone.

Refusals are immediate (nothing queues), so a client backs off and retries. Costs use the request's
values clamped to the server limits (a request beyond them is rejected later as INVALID_ARGUMENT, with
its field path); a request that does not parse costs 1 and fails in its worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import DecodeError

from runtime.api import ImageRequest
from runtime.server.config import LimitsConfig
from runtime.server.protos import personalization_pb2 as ppb
from runtime.types import SEARCH_BEAM_MAX_NEW_TOKENS, BeamOptions, SamplingOptions

CHEAP_RPCS = frozenset({"RecordInteraction", "UpsertItem", "GetItem", "ListItems", "DeleteItem",
                        "DeleteInteraction", "ForgetUser"})
"""RPCs that do no model work: bounded by ``max_inflight_cheap``, never by ``max_inflight``."""

# The defaults a request runs with when it leaves a field 0 (the engine's own request defaults).
_DEFAULT_EXPLAIN_TOKENS = SamplingOptions().max_new_tokens
_DEFAULT_BEAM_TOKENS = {"Recommend": BeamOptions().max_new_tokens, "Search": SEARCH_BEAM_MAX_NEW_TOKENS}
VQGAN_CODE_STEPS = 256
"""Decode steps of a GenerateImage on the VQGAN path (16x16 code tokens)."""
_DEFAULT_IMAGE_STEPS = int(ImageRequest.__dataclass_fields__["steps"].default)  # type: ignore[arg-type]


def _clamp(value: int, default: int, limit: int) -> int:
    """The value a request will run with: 0 (unset) is the default, and nothing counts above the limit."""
    return min(max(value, 0) or default, limit)


def request_cost(rpc: str, raw: bytes, limits: LimitsConfig) -> int:
    """Decode row-steps one model request holds while it runs (see the module docstring)."""
    try:
        if rpc == "Explain":
            explain = ppb.ExplainRequest.FromString(raw)
            beams = _clamp(explain.sampling.num_beams, 1, limits.max_beams)
            return beams * _clamp(explain.sampling.max_new_tokens, _DEFAULT_EXPLAIN_TOKENS, limits.max_new_tokens)
        if rpc in _DEFAULT_BEAM_TOKENS:
            ranked = (ppb.RecommendRequest if rpc == "Recommend" else ppb.SearchRequest).FromString(raw)
            options = ranked.options
            if options.mode in (ppb.DECODE_MODE_UNSPECIFIED, ppb.DECODE_MODE_FAST):
                return 1
            top_k = _clamp(options.top_k, 10, limits.max_top_k)
            beams = _clamp(options.beam.num_beams, limits.default_num_beams(top_k), limits.max_beams)
            return beams * _clamp(options.beam.max_new_tokens, _DEFAULT_BEAM_TOKENS[rpc], limits.max_new_tokens)
        if rpc == "GenerateImage":
            image = ppb.GenerateImageRequest.FromString(raw)
            if image.image_model == ppb.IMAGE_MODEL_VQGAN:
                return VQGAN_CODE_STEPS
            return _clamp(image.steps, _DEFAULT_IMAGE_STEPS, limits.max_image_steps)
    except DecodeError:
        return 1
    return 1


@dataclass
class Admission:
    """Counters of admitted work; used on the event loop only (no locking)."""

    max_inflight: int
    max_inflight_cheap: int
    max_inflight_cost: int
    inflight: int = 0
    """Model requests holding a slot."""
    inflight_cheap: int = 0
    cost: int = 0
    """Sum of the costs of the admitted model requests."""

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and self.inflight_cheap == 0

    def refusal(self, rpc: str, cost: int) -> tuple[str, str] | None:
        """(metrics reason, message) when rpc with this cost cannot start now; None when it can."""
        if rpc in CHEAP_RPCS:
            if self.inflight_cheap >= self.max_inflight_cheap:
                return "overload_cheap", (
                    f"the server is at its limit of {self.max_inflight_cheap} catalog and interaction requests "
                    "in flight; retry with backoff")
            return None
        if self.inflight >= self.max_inflight:
            return "overload", (
                f"the server is at its limit of {self.max_inflight} model requests in flight; retry with backoff")
        if self.cost > 0 and self.cost + cost > self.max_inflight_cost:
            return "cost", (
                f"the request needs {cost} decode row-steps but only {self.max_inflight_cost - self.cost} of "
                f"the server's {self.max_inflight_cost} are free; retry with backoff or ask for fewer "
                "beams / tokens / steps")
        return None

    def take(self, rpc: str, cost: int) -> None:
        if rpc in CHEAP_RPCS:
            self.inflight_cheap += 1
        else:
            self.inflight += 1
            self.cost += cost

    def give_back(self, rpc: str, cost: int) -> None:
        if rpc in CHEAP_RPCS:
            self.inflight_cheap -= 1
        else:
            self.inflight -= 1
            self.cost -= cost
