"""Admission costs and bounds (runtime.server.admission), without a server."""

from __future__ import annotations

from runtime.server.admission import Admission, request_cost
from runtime.server.config import LimitsConfig
from runtime.server.protos import personalization_pb2 as ppb

LIMITS = LimitsConfig()


def _explain(**sampling: int) -> bytes:
    return ppb.ExplainRequest(sampling=ppb.SamplingOptions(**sampling)).SerializeToString()


def test_explain_costs_beams_times_tokens_with_defaults_and_limits() -> None:
    assert request_cost("Explain", _explain(num_beams=16, max_new_tokens=20), LIMITS) == 320
    assert request_cost("Explain", _explain(), LIMITS) == 64  # 1 beam x the default 64 tokens
    # beyond the limits the request fails validation later; its cost counts only up to them
    assert request_cost("Explain", _explain(num_beams=99, max_new_tokens=100000), LIMITS) == 16 * 512


def test_ranking_costs_only_in_beam_mode() -> None:
    fast = ppb.RecommendRequest(options=ppb.DecodeOptions(top_k=5)).SerializeToString()
    assert request_cost("Recommend", fast, LIMITS) == 1
    beam = ppb.RecommendRequest(options=ppb.DecodeOptions(mode=ppb.DECODE_MODE_BEAM, top_k=5))
    assert request_cost("Recommend", beam.SerializeToString(), LIMITS) == 10 * 50
    search = ppb.SearchRequest(options=ppb.DecodeOptions(mode=ppb.DECODE_MODE_BEAM, top_k=12,
                                                          beam=ppb.BeamOptions(max_new_tokens=8)))
    assert request_cost("Search", search.SerializeToString(), LIMITS) == 12 * 8


def test_image_costs_its_steps_and_garbage_costs_one() -> None:
    assert request_cost("GenerateImage", ppb.GenerateImageRequest(steps=40).SerializeToString(), LIMITS) == 40
    assert request_cost("GenerateImage", b"", LIMITS) == 20
    assert request_cost("Explain", b"\xff\xff\xff", LIMITS) == 1
    assert request_cost("SelectItems", b"", LIMITS) == 1


def test_bounds_are_separate_and_an_oversized_request_runs_alone() -> None:
    a = Admission(max_inflight=1, max_inflight_cheap=1, max_inflight_cost=100)
    assert a.refusal("Explain", 500) is None  # nothing else holds budget
    a.take("Explain", 500)
    assert (a.refusal("Recommend", 1) or ("",))[0] == "overload"  # the one model slot is taken
    assert a.refusal("GetItem", 0) is None
    a.take("GetItem", 0)
    assert (a.refusal("ListItems", 0) or ("",))[0] == "overload_cheap"  # and the one cheap slot
    a.give_back("Explain", 500)
    a.give_back("GetItem", 0)
    assert a.idle and a.cost == 0
    b = Admission(max_inflight=4, max_inflight_cheap=1, max_inflight_cost=100)
    b.take("Explain", 60)
    assert b.refusal("Explain", 40) is None
    refused = b.refusal("Explain", 41)
    assert refused is not None and refused[0] == "cost" and "41" in refused[1]
