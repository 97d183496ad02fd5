"""The ``unimp`` command: export, validate, catalog encode, preflight, quantize, build-engines, serve, client,
plan, doctor, eval, bench.

``export`` and ``validate`` need the export extra (torch); they import it only when run, so ``serve`` and
``client`` start fast and never load torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from pathlib import Path


def _export(args: argparse.Namespace) -> int:
    try:
        from export.pipeline import export_checkpoint, export_demo
    except ImportError as exc:
        print(f"unimp export needs the export extra (pip install 'unimp-edge[export]'): {exc}", file=sys.stderr)
        return 2
    from export.checkpoints import CheckpointError
    from export.resume import TrainingStopped

    trained_only = [("--train-steps", args.train_steps is not None), ("--save-every", args.save_every is not None),
                    ("--train-max-minutes", args.train_max_minutes is not None), ("--restart", args.restart)]
    for flag, given in trained_only:
        if given and (not args.demo or args.untrained or args.semantic_ids):
            print(f"error: {flag}: only with --demo (trained: not --untrained or --semantic-ids)", file=sys.stderr)
            return 2
    if args.save_every is not None and args.save_every < 0:
        print(f"error: --save-every: must be >= 0 (0: only when stopped and at the end), got {args.save_every}",
              file=sys.stderr)
        return 2
    if args.train_max_minutes is not None and not args.train_max_minutes > 0:
        print(f"error: --train-max-minutes: must be > 0, got {args.train_max_minutes}", file=sys.stderr)
        return 2
    if args.train_steps is not None and args.train_steps < 1:
        print(f"error: --train-steps: must be >= 1, got {args.train_steps}", file=sys.stderr)
        return 2
    if args.attention != "gqa" and args.kv_layout != "inplace":
        print(f"error: --attention: {args.attention} needs --kv-layout inplace (concat is standard ops already)",
              file=sys.stderr)
        return 2
    try:
        if args.demo:
            manifest = export_demo(args.demo, args.out, seed=args.seed, progress=not args.quiet,
                                   with_diffusion=not args.no_diffusion, semantic_ids=args.semantic_ids,
                                   with_vqgan=not args.no_vqgan, trained=not (args.untrained or args.semantic_ids),
                                   train_steps=args.train_steps, kv_layout=args.kv_layout,
                                   attention=args.attention, save_every=args.save_every,
                                   train_max_minutes=args.train_max_minutes, restart=args.restart)
        else:
            manifest = export_checkpoint(args.checkpoint, args.out, progress=not args.quiet,
                                         diffusion=args.diffusion, vqgan=args.vqgan, kv_layout=args.kv_layout,
                                         attention=args.attention)
    except TrainingStopped as stopped:
        why = {"time": f"after --train-max-minutes {args.train_max_minutes:g}" if args.train_max_minutes else "",
               "stop_after": "on request"}.get(stopped.reason, f"on {stopped.reason}")
        again = [a for a in (args.argv or []) if a != "--restart"]
        where = f"{stopped.stage}, step" if stopped.stage != "train" else "step"
        print(f"training stopped {why} ({where} {stopped.step}/{stopped.steps}); the progress is saved "
              f"in {stopped.state_dir}. Run the same command again to continue"
              + (f": unimp {' '.join(shlex.quote(a) for a in again)}" if again else ""), file=sys.stderr)
        return stopped.exit_code
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    params = manifest.source.get("parameters", 0)
    print(f"exported {manifest.model_name} ({params / 1e6:.1f}M parameters) to {args.out}")
    for name, entry in manifest.graphs.items():
        val = manifest.source.get("validation", {}).get(name) or entry.extra.get("validation", {})
        err = val.get("max_abs_error")
        print(f"  {name:<13} {entry.file:<28} max abs error vs PyTorch: {err if err is not None else 'n/a'}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    try:
        from export.pipeline import dump_report, validate_artifacts
    except ImportError as exc:
        print(f"unimp validate needs the export extra (pip install 'unimp-edge[export]'): {exc}", file=sys.stderr)
        return 2
    from runtime.manifest import ManifestError

    try:
        report = validate_artifacts(args.artifacts, args.checkpoint)
    except (ManifestError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(dump_report(report))
    return 0


def _catalog_encode(args: argparse.Namespace) -> int:
    from runtime.manifest import ManifestError
    from runtime.vision.catalog_encode import encode_catalog

    if args.batch is not None and args.batch < 1:
        print(f"error: --batch: must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    if args.threads < 0:
        print(f"error: --threads: must be >= 0, got {args.threads}", file=sys.stderr)
        return 2
    try:
        reports = encode_catalog(args.artifacts, args.cache_dir, batch=args.batch, provider=args.provider,
                                 threads=args.threads, progress=not args.quiet)
    except KeyboardInterrupt:
        print("interrupted: what was encoded so far is kept; run the same command again to continue",
              file=sys.stderr)
        return 130
    except (ManifestError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for r in reports:
        skipped = f", {r.skipped} skipped (see the log)" if r.skipped else ""
        print(f"{r.kind:<12} {r.directory}: wrote {r.encoded_now}{skipped}; {r.items} items, {r.pending} pending; "
              f"{r.bytes_per_item / 2**10:.1f} KiB per item, {r.disk_bytes / 2**20:.1f} MiB on disk")
    return 0


def _quantize(args: argparse.Namespace) -> int:
    try:
        from export.quantize import (
            QuantizeConfig,
            QuantizeError,
            guard_summary,
            guard_tasks,
            quantize_artifacts,
            record_guard,
        )
    except ImportError as exc:
        print(f"unimp quantize needs the export extra (pip install 'unimp-edge[export]'): {exc}", file=sys.stderr)
        return 2
    from runtime.eval.data import DataError
    from runtime.eval.guard import GuardThresholds
    from runtime.eval.runner import EvalConfig, EvalError
    from runtime.manifest import ManifestError, load_manifest

    graphs = None if args.graphs is None else tuple(g.strip() for g in args.graphs.split(",") if g.strip())
    config = QuantizeConfig(precision=args.precision, format=args.format, graphs=graphs, block_size=args.block_size,
                            accuracy_level=args.accuracy_level, keep_lm_head=args.keep_lm_head,
                            int8_lm_head=args.int8_lm_head, calibration=args.calibration)
    try:
        config.validate()
        tasks = guard_tasks([t.strip() for t in args.guard_tasks.split(",") if t.strip()])
        if args.guard_limit is not None and args.guard_limit < 1:
            raise QuantizeError(f"--guard-limit: must be >= 1, got {args.guard_limit}")
        if args.guard_explain_tokens < 1:
            raise QuantizeError(f"--guard-explain-tokens: must be >= 1, got {args.guard_explain_tokens}")
        if args.threads < 0:
            raise QuantizeError(f"--threads: must be >= 0, got {args.threads}")
        section = quantize_artifacts(args.artifacts, args.out, config, force=args.force, progress=not args.quiet)
    except QuantizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    written = load_manifest(args.out, verify=False)
    for name in section["graphs"]:
        q = written.graphs[name].extra["quantization"]
        ops = ", ".join(f"{k} x{v}" for k, v in q["quantized_ops"].items())
        print(f"  {name:<12} {q['bytes_before'] / 2**20:8.2f} MiB -> {q['bytes_after'] / 2**20:8.2f} MiB  ({ops})")
    print(f"wrote {args.precision} variant of {args.artifacts} to {args.out}")
    if args.skip_guard:
        print("accuracy guard skipped (--skip-guard): the manifest records it as not run; `unimp serve` warns",
              file=sys.stderr)
        return 0
    from runtime.eval.cli import eval_report
    from runtime.eval.report import render_markdown

    limits = GuardThresholds(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GuardThresholds)})
    eval_config = EvalConfig(tasks=tasks, explain_tokens=args.guard_explain_tokens, progress=not args.quiet)
    try:
        report = eval_report(args.out, eval_config, against=args.artifacts, limits=limits, split=args.guard_split,
                             limit=args.guard_limit, data=args.guard_data, threads=args.threads)
    except (DataError, ManifestError, EvalError, FileNotFoundError) as exc:
        print(f"error: accuracy guard could not run: {exc} (the manifest records it as not run)", file=sys.stderr)
        return 2
    summary = guard_summary(report)
    record_guard(args.out, summary)
    print(render_markdown(report))
    for task, verdict in summary["tasks"].items():
        print(f"  guard {task:<12} {'passed' if verdict['passed'] else 'FAILED'}")
    if not summary["passed"]:
        failed = [c["name"] for v in summary["tasks"].values() for c in v["checks"] if not c["passed"]]
        print(f"accuracy guard FAILED for {', '.join(summary['failed_tasks'])}: {'; '.join(failed)} "
              f"(recorded in {args.out / 'manifest.json'})", file=sys.stderr)
        return 1
    print(f"accuracy guard passed on {summary['users']} {summary['split']} users (recorded in the manifest)")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    try:
        from export.preflight import run_cli
    except ImportError as exc:
        print(f"unimp preflight needs onnx (pip install 'unimp-edge[export]'): {exc}", file=sys.stderr)
        return 2
    return run_cli(args.artifacts, args.tensorrt, run=not args.no_run, as_json=args.json, threads=args.threads,
                   quiet=args.quiet)


def _add_preflight(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "preflight", help="check every graph of ART against a TensorRT version's ONNX support (no GPU needed)",
        description="Check every graph of ART for TensorRT without TensorRT: the opset against the version's "
                    "maximum, every op against its ONNX operator matrix (custom-domain ops rejected with the option "
                    "that avoids them), build-time constant axes, Q/DQ zero points 0, no data-dependent-shape ops, "
                    "data types, and every optimization profile (ranks, 0 <= min <= opt <= max, static dims fixed, "
                    "one range per symbolic dim, derived dims such as past+seq, the decoder's positions); then run "
                    "onnxruntime CPU at each profile's min and max shapes. One line per graph and check; exit 1 "
                    "when a check fails, 2 for bad usage. Whether TensorRT's parser really accepts the graphs needs "
                    "a machine with TensorRT.")
    p.add_argument("artifacts", type=Path, metavar="ART", help="artifacts directory written by `unimp export`")
    p.add_argument("--tensorrt", choices=["10.3", "10.x", "11"], default="10.3",
                   help="target: 10.3 (JetPack 6, max opset 20), 10.x (>= 10.15, max opset 24: adds Attention, "
                        "TensorScatter, RotaryEmbedding, RMSNormalization), 11 (max opset 25); default %(default)s")
    p.add_argument("--no-run", action="store_true", help="static checks only: skip the onnxruntime runs")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="onnxruntime intra-op threads for the runs (default: 0, all physical cores)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_preflight)


def _serve_warning(args: argparse.Namespace) -> None:
    """Warn when the served artifacts are a quantized variant whose accuracy guard failed or did not run."""
    artifacts = getattr(args, "artifacts", None)
    if artifacts is None:
        try:
            from runtime.server.config import load_config

            artifacts = load_config(getattr(args, "config", None)).artifacts
        except Exception:
            return
    if artifacts is None:
        return
    from export.quantize import guard_warning

    warning = guard_warning(Path(artifacts))
    if warning:
        logging.getLogger("unimp.quantize").warning("%s; serving it anyway", warning)


def _add_plan(sub: argparse._SubParsersAction) -> None:
    from runtime.plan import add_plan_arguments, run_plan

    p = sub.add_parser("plan", help="memory budget of serving ART on a board (Jetson Orin, x86 + GPU): what fits")
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)


def _add_doctor(sub: argparse._SubParsersAction) -> None:
    from runtime.doctor import add_doctor_arguments, run_doctor

    p = sub.add_parser("doctor", help="what this machine can run (providers, GPU, TensorRT); --bench: time each path")
    add_doctor_arguments(p)
    p.set_defaults(func=run_doctor)

def _build_engines(args: argparse.Namespace) -> int:
    from export.engines import main as build_main

    return build_main(args)


def _add_build_engines(sub: argparse._SubParsersAction) -> None:
    from export.engines import add_arguments

    p = sub.add_parser(
        "build-engines", help="TensorRT engines for this GPU from the ONNX graphs, recorded in the manifest",
        description="Build one TensorRT engine per graph of ART on this machine's GPU (strongly typed: precision "
                    "comes from the ONNX graphs; the decoder gets a prefill and a decode profile), with a timing "
                    "cache, and record each engine in ART's manifest with its key (TensorRT version, GPU, "
                    "precision, profiles, graph sha256). `unimp serve --provider tensorrt` then runs them and "
                    "refuses an engine built for another TensorRT or GPU. Needs TensorRT and an NVIDIA GPU.")
    add_arguments(p)
    p.set_defaults(func=_build_engines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unimp", description="UniMP Edge: export and serve UniMP personalization models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="export a checkpoint (or a seeded demo) to validated ONNX graphs + manifest")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--demo", choices=["tiny", "small"], help="build a seeded demo checkpoint and export it")
    src.add_argument("--checkpoint", type=Path, help="checkpoint directory (see README: Checkpoint directory)")
    p.add_argument("--out", type=Path, required=True, help="artifacts directory to write")
    p.add_argument("--diffusion", type=Path, default=None,
                   help="diffusers-format directory to export for image generation (with --checkpoint)")
    p.add_argument("--no-diffusion", action="store_true", help="with --demo: skip the demo diffusion model")
    p.add_argument("--semantic-ids", action="store_true",
                   help="with --demo: spell items as seeded 4-token semantic ids (catalog/id2semantic.json); "
                        "the semantic-ID demo is untrained")
    p.add_argument("--vqgan", type=Path, default=None,
                   help="taming-transformers VQGAN directory (model.ckpt + config) for the paper's image-code "
                        "generation path (with --checkpoint)")
    p.add_argument("--no-vqgan", action="store_true", help="with --demo: skip the demo VQGAN")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo weights, tokenizer, catalog and shop")
    p.add_argument("--untrained", action="store_true",
                   help="with --demo: keep the seeded random weights instead of training on the synthetic shop")
    p.add_argument("--train-steps", type=int, default=None, metavar="N",
                   help="with --demo (trained): N optimizer steps instead of the preset's (tiny 300, small 300)")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="with --demo (trained): save the training state in OUT/checkpoint/.train-cache every N "
                        "steps (default: small 10, tiny 0 = only when stopped and at the end); it is also saved on "
                        "SIGINT/SIGTERM, and running the same command again on OUT resumes it")
    p.add_argument("--train-max-minutes", type=float, default=None, metavar="M",
                   help="with --demo (trained): stop after M minutes (catalog encode and training, counted from "
                        "the start) with the state saved and exit 0; run the same command again to continue")
    p.add_argument("--restart", action="store_true",
                   help="with --demo (trained): discard a saved training state in OUT and train from the start "
                        "(the keyed catalog-encode cache is kept)")
    p.add_argument("--kv-layout", choices=["inplace", "concat"], default="inplace",
                   help="decoder KV cache form: inplace (a static buffer written in place, attention per "
                        "--attention; onnxruntime CPU/CUDA, TensorRT >= 10.15 with --attention onnx) or concat (present = Concat(past, new), for TensorRT 10.3 / "
                        "JetPack 6); default %(default)s")
    p.add_argument("--attention", choices=["gqa", "onnx"], default="gqa",
                   help="with --kv-layout inplace, the decoder's self-attention: gqa (com.microsoft."
                        "GroupQueryAttention; onnxruntime) or onnx (standard ops only, opset 24: TensorScatter "
                        "cache update + MatMul/Softmax, what TensorRT >= 10.15 builds in place); default %(default)s")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_export)

    p = sub.add_parser("validate", help="re-run every graph against the PyTorch reference; print a JSON report")
    p.add_argument("artifacts", type=Path, help="artifacts directory written by `unimp export`")
    p.add_argument("--checkpoint", type=Path, default=None, help="source checkpoint (default: the one in the manifest)")
    p.set_defaults(func=_validate)

    p = sub.add_parser("catalog", help="catalog stores: precompute what the server would encode")
    catalog_sub = p.add_subparsers(dest="catalog_command", required=True, metavar="COMMAND")
    p = catalog_sub.add_parser(
        "encode", help="precompute the catalog's media latents and cross-attention K/V (batched, resumable)",
        description="Encode every catalog image of ART into the memory-mapped stores that `unimp serve` reads: "
                    "media latents, cross-attention K/V per image (and VQGAN codes when ART has the VQGAN graphs). "
                    "Items already encoded are skipped, so an interrupted run continues where it stopped; a "
                    "server started on the result has nothing left to encode. Without it the server encodes "
                    "missing items in the background while serving.")
    p.add_argument("artifacts", type=Path, metavar="ART", help="artifacts directory written by `unimp export`")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="images per graph call (default: the largest batch the vision graph was exported for)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                   help="ONNX Runtime execution provider (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="intra-op threads (default: 0, ONNX Runtime's choice: all physical cores)")
    p.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                   help="latent store directory (default: ART/.cache/latents, where `unimp serve` looks); the "
                        "K/V store is DIR-media-kv beside it")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_catalog_encode)

    _add_preflight(sub)

    from runtime.eval.cli import GUARD_FIELD_HELP
    from runtime.eval.data import SPLITS
    from runtime.eval.guard import GuardThresholds
    from runtime.eval.runner import TASKS

    p = sub.add_parser(
        "quantize", help="int8 / int4 / fp16 weights: a new artifacts directory, checked by the accuracy guard",
        description="Write a quantized variant of ART to --out: a complete artifacts directory (its own manifest "
                    "with each graph's precision, quantization settings and sha256, and the sha256 of ART's "
                    "manifest; every other file hard-linked) that serve, eval and bench take like any other. "
                    "Then run the accuracy guard of `unimp eval --against ART` on it and record the per-task "
                    "result in its manifest; exit 1 when the guard fails (the variant is kept, marked failed, and "
                    "`unimp serve` warns about it), 2 for bad usage.")
    p.add_argument("artifacts", type=Path, metavar="ART", help="fp32 artifacts directory written by `unimp export`")
    p.add_argument("--precision", choices=["int8", "int4", "fp16"], required=True,
                   help="int8: cpu format dynamic int8 MatMulInteger (onnxruntime quantize_dynamic, per-tensor "
                        "weights), qdq format static int8 Q/DQ (quantize_static, symmetric, per-channel weights, "
                        "calibrated); int4: block-wise symmetric 4-bit weights (cpu: MatMulNBits, qdq: blocked "
                        "DequantizeLinear, weight-only); fp16: float16 weights and compute with fp32 graph I/O "
                        "(a GPU precision; also the diffusion graphs; runs slowly on the CPU)")
    p.add_argument("--format", choices=["cpu", "qdq"], default="cpu",
                   help="graph form: cpu, what onnxruntime's CPU provider runs fastest; qdq, explicit "
                        "QuantizeLinear/DequantizeLinear in standard ONNX ops, what TensorRT builds "
                        "(onnxruntime CPU runs it too; needs a --kv-layout concat decoder) (default: %(default)s)")
    p.add_argument("--calibration", type=int, default=16, metavar="N",
                   help="int8 qdq: calibration feeds per graph, recorded from N demo requests (rated catalog "
                        "histories, a short explanation, a recommendation) on ART (default: %(default)s)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="new artifacts directory to write")
    p.add_argument("--force", action="store_true", help="replace --out when it is an existing artifacts directory")
    p.add_argument("--graphs", default=None,
                   help="comma-separated graphs to convert, of decoder,media_kv,vision (fp16: also text_encoder, "
                        "unet, vae_decoder) (default: all three; fp16: also the diffusion graphs present); the "
                        "others and any VQGAN graph stay fp32")
    p.add_argument("--block-size", type=int, default=32, metavar="N",
                   help="int4: weights per quantization block (a power of two >= 16; default: %(default)s)")
    p.add_argument("--accuracy-level", type=int, default=4, metavar="L",
                   help="int4: MatMulNBits activation compute type, 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 "
                        "(default: %(default)s, the fast one on x86)")
    p.add_argument("--keep-lm-head", action="store_true", help="keep the decoder's LM head MatMul in fp32")
    p.add_argument("--int8-lm-head", action="store_true",
                   help="int4 cpu: the decoder's LM head in dynamic int8 (MatMulInteger) instead of int4 blocks")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="guard: ONNX Runtime intra-op threads (default: 0, all physical cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    guard = p.add_argument_group("accuracy guard (unimp eval OUT --against ART)")
    guard.add_argument("--skip-guard", action="store_true",
                       help="do not run the guard (the manifest records it as not run; `unimp serve` warns)")
    guard.add_argument("--guard-split", choices=SPLITS, default="test",
                       help="users the guard evaluates (default: %(default)s)")
    guard.add_argument("--guard-limit", type=int, default=None, metavar="N", help="only the split's first N users")
    guard.add_argument("--guard-data", type=Path, default=None, metavar="DIR",
                       help="directory with {train,validation,test}.jsonl (default: ART/shop)")
    guard.add_argument("--guard-tasks", default=",".join(TASKS),
                       help="comma-separated tasks the guard runs (default: %(default)s)")
    guard.add_argument("--guard-explain-tokens", type=int, default=64, metavar="N",
                       help="new-token limit of the guard's greedy explanations (default: %(default)s)")

    for f in dataclasses.fields(GuardThresholds):
        guard.add_argument("--" + f.name.replace("_", "-"), type=float, default=f.default, metavar="X",
                           help=f"{GUARD_FIELD_HELP.get(f.name, '')} (default: %(default)s)")
    p.set_defaults(func=_quantize)
    _add_build_engines(sub)

    try:
        from runtime.server.cli_commands import (
            add_client_arguments,
            add_serve_arguments,
            run_client,
            run_serve,
        )
    except ImportError:
        pass
    else:
        p = sub.add_parser("serve", help="serve the artifacts over gRPC")
        add_serve_arguments(p)
        p.set_defaults(func=run_serve, pre=_serve_warning)
        p = sub.add_parser("client", help="call the server")
        add_client_arguments(p)
        p.set_defaults(func=run_client)

    _add_plan(sub)
    _add_doctor(sub)

    from runtime.eval.cli import add_eval_arguments, run_eval

    p = sub.add_parser("eval", help="the paper's metrics on held-out users; --against REF: the accuracy guard")
    add_eval_arguments(p)
    p.set_defaults(func=run_eval)

    try:
        from benchmarks.cli import add_bench_arguments, run_bench
    except ImportError:
        pass
    else:
        p = sub.add_parser("bench", help="benchmarks: per-stage latency, baselines, load, memory")
        add_bench_arguments(p)
        p.set_defaults(func=run_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    pre = getattr(args, "pre", None)
    if pre is not None:
        pre(args)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
