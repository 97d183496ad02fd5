"""``unimp eval ART``: metrics on a split's users; ``--against REF`` adds the accuracy guard.

Exit status: 0 when the run (and the guard, if any) passes, 1 when a guard check fails, 2 for bad usage
(unknown task, missing split file, unusable artifacts, a request the runtime refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from runtime.backends.base import Provider
from runtime.eval.data import SPLITS, DataError, data_dir, load_split
from runtime.eval.guard import GuardThresholds, compare
from runtime.eval.report import render_markdown
from runtime.eval.runner import (
    TASKS,
    EvalConfig,
    EvalError,
    UserRecord,
    catalog_items,
    evaluate,
    score,
    train_baselines,
)

log = logging.getLogger(__name__)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the served graphs on a split's held-out users and report the paper's metrics (recommendation "
        "and search HR/NDCG/MRR@3,5,10, rating MAE/RMSE, explanation ROUGE-1/2/L F-measures, BLEU-1 with its brevity "
        "penalty and plain unigram precision, selection precision/recall/F1) beside random and popularity "
        "baselines, as a Markdown table on stdout and optionally JSON. With --against REF, also run REF on "
        "the same users and exit 1 when a difference passes a threshold; exit 2 for bad usage."
    )
    parser.add_argument("artifacts", type=Path, help="artifacts directory (the output of `unimp export`)")
    parser.add_argument("--split", choices=SPLITS, default="test", help="users to evaluate (default: %(default)s)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="comma-separated tasks, of %(default)s (default: all)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="only the split's first N users")
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="directory with {train,validation,test}.jsonl (default: ARTIFACTS/shop)")
    parser.add_argument("--beam", action="store_true",
                        help="also rank with the paper beam (10 beams) and the constrained beam (slow)")
    parser.add_argument("--explain-tokens", type=int, default=64, metavar="N",
                        help="new-token limit of the greedy explanations (default: %(default)s)")
    parser.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                        help="execution provider (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="ONNX Runtime intra-op threads (default: 0, all physical cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    guard = parser.add_argument_group("accuracy guard (with --against)")
    guard.add_argument("--against", type=Path, default=None, metavar="REF_ART",
                       help="reference artifacts run on the same users; exit 1 when a check below fails")
    for f in dataclasses.fields(GuardThresholds):
        doc = GUARD_FIELD_HELP.get(f.name, "")
        guard.add_argument(_flag(f.name), type=float, default=f.default, metavar="X",
                           help=f"{doc} (default: %(default)s)")


GUARD_FIELD_HELP = {
    "max_hr_diff": "largest |HR@10 difference| of recommendation and search, per decode mode",
    "min_overlap": "smallest mean top-10 item overlap with the reference, per ranking task and mode",
    "min_rating_agreement": "smallest share of requests with the reference's argmax rating",
    "max_rmse_diff": "largest |RMSE difference| of the argmax rating",
    "max_rouge_l_diff": "largest |ROUGE-L F difference| of the explanations",
    "min_selection_agreement": "smallest share of selection requests with the reference's selected set",
    "min_explanation_match": "smallest share of explanations equal to the reference's (0: not enforced)",
}


def _run(artifacts: Path, users: list[Any], config: EvalConfig, provider: Provider, threads: int,
         desc: str) -> tuple[dict[str, Any], list[UserRecord], tuple[str, ...]]:
    from runtime.backends import BackendConfig
    from runtime.engine import Runtime, RuntimeConfig

    runtime = Runtime.open(artifacts, RuntimeConfig(
        backend=BackendConfig(provider=provider, intra_op_threads=threads), progress=config.progress))
    try:
        records, seconds = evaluate(runtime, users, config, desc=desc)
        decoder = runtime.manifest.graphs["decoder"]
        meta = {"artifacts": str(artifacts), "model": runtime.manifest.model_name, "backend": provider,
                "precision": decoder.precision,
                "precisions": {name: g.precision for name, g in runtime.manifest.graphs.items()},
                "seconds": seconds}
        return meta, records, catalog_items(runtime)
    finally:
        runtime.close()


def eval_report(artifacts: Path, config: EvalConfig, *, against: Path | None = None,
                limits: GuardThresholds | None = None, split: str = "test", limit: int | None = None,
                data: Path | None = None, provider: Provider = "cpu", threads: int = 0) -> dict[str, Any]:
    """The report of ``unimp eval ARTIFACTS [--against AGAINST]`` as a dict (with a ``guard`` section when
    ``against`` is given). Raises DataError, ManifestError, EvalError or FileNotFoundError."""
    directory = data_dir(artifacts, data)
    users = load_split(directory, split, limit)
    train = load_split(directory, "train")
    meta, records, items = _run(artifacts, users, config, provider, threads, "eval")
    base = train_baselines(train, items)
    report: dict[str, Any] = {**score(users, records, config, base), **meta}
    report.update({"split": split, "data": str(directory), "users": len(users), "tasks": list(config.tasks),
                   "beam": config.beam})
    if against is not None:
        ref_meta, ref_records, _ = _run(against, users, config, provider, threads, "reference")
        reference = {**score(users, ref_records, config, base), **ref_meta}
        report["reference"] = reference
        report["guard"] = compare(records, ref_records, report, reference, config.tasks,
                                  limits if limits is not None else GuardThresholds())
    return report


def run_eval(args: argparse.Namespace) -> int:
    """Run ``unimp eval``; returns the exit status."""
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        print(f"error: --tasks: unknown task(s) {', '.join(unknown) or '(none given)'}; choose from "
              f"{','.join(TASKS)}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1:
        print(f"error: --limit: must be >= 1, got {args.limit}", file=sys.stderr)
        return 2
    if args.explain_tokens < 1:
        print(f"error: --explain-tokens: must be >= 1, got {args.explain_tokens}", file=sys.stderr)
        return 2
    from runtime.manifest import ManifestError

    config = EvalConfig(tasks=tasks, beam=args.beam, explain_tokens=args.explain_tokens, progress=not args.quiet)
    t0 = time.perf_counter()
    try:
        limits = GuardThresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GuardThresholds)})
        report = eval_report(args.artifacts, config, against=args.against, limits=limits, split=args.split,
                             limit=args.limit, data=args.data, provider=args.provider, threads=args.threads)
    except (DataError, ManifestError, EvalError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    report["seconds_total"] = time.perf_counter() - t0
    print(render_markdown(report))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        log.info("wrote %s", args.json)
    if "guard" in report and not report["guard"]["passed"]:
        failed = [c["name"] for c in report["guard"]["checks"] if not c["passed"]]
        print(f"accuracy guard FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
