"""Item selection: the UniMP selection prompt; the candidates picked from its ``s_i`` logits."""

from __future__ import annotations

import time

from runtime.decoding.itemslice import select_candidates
from runtime.prompts import selection_prompt
from runtime.tasks.context import TaskContext
from runtime.types import InvalidRequest, SelectRequest, SelectResult, Timings


def select_items(ctx: TaskContext, request: SelectRequest) -> SelectResult:
    t_start = time.perf_counter()
    history = ctx.resolve(request.history)
    candidates = ctx.resolve(request.candidates, name="candidates")
    if not 1 <= request.max_selected <= max(1, len(candidates)):
        raise InvalidRequest(f"max_selected: must be in 1..{max(1, len(candidates))} (the number of candidates), "
                             f"got {request.max_selected}", field="max_selected")
    ctx.requests += 1
    prompt = ctx.fit(lambda n: selection_prompt(history, candidates, n), len(history), "candidates")
    pre = ctx.prefill(prompt, request.tenant, request.cancel, request.user_id)
    sel = select_candidates(pre.logits, ctx.manifest.tokens.selections, len(candidates), request.max_selected)
    timings = Timings(pre.vision_s, pre.prefill_s, 0.0, time.perf_counter() - t_start, pre.vision_s + pre.prefill_s, 0, pre.hit)
    return SelectResult(sel.selected, sel.scores, timings)
