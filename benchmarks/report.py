"""Benchmark results -> Markdown tables, PNG plots, and the README's "Performance" section.

``render_markdown(results)`` turns the ``results.json`` that ``unimp bench`` writes into Markdown;
``write_plots`` draws the figures (matplotlib, Agg backend); ``update_readme`` copies the plots to
``docs/bench/`` and replaces the README text between ``<!-- bench:start -->`` and ``<!-- bench:end -->``.
A section module may define ``render_markdown(result: dict, heading: str) -> str`` to render its own
results; otherwise a generic table of its numbers is used.

    python -m benchmarks.report bench-results/results.json --update-readme
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import shutil
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

START_MARKER = "<!-- bench:start -->"
END_MARKER = "<!-- bench:end -->"
README_HEADING = "## Performance"
REPO_ROOT = Path(__file__).resolve().parent.parent
STAGES = ("vision", "prefill", "decode", "other")
SHARED_CORES = 0.25
"""Other processes using more than this many cores on average mark a run (or a section) as shared."""
TASK_LABELS = {"recommend": "recommendation (fast path)", "search": "search (fast path)",
               "explain": "preference + explanation", "select_items": "item selection"}

PERFORMANCE_INTRO = """\
`make bench` runs every benchmark section on the `small` demo (253M parameters; exported to
`out/bench-small` on first use, with progress; the first Runtime start on new artifacts also encodes the
catalog's 2,000 images once, which takes minutes on 2 cores) and writes `bench-results/results.json`
(machine, package versions, settings, every number, every target), `bench-results/results.md` and
`bench-results/plots/`.

```bash
make bench                                          # = unimp bench --preset small --out bench-results
unimp bench --preset tiny --quick                   # smoke run on the tiny demo
unimp bench --artifacts out/small --sections tasks,floor --repeats 5 --threads 2
unimp bench ... --update-readme                     # also refresh the results below and docs/bench/*.png
python -m benchmarks.report bench-results/results.json --update-readme   # the same, from a saved run
```

Sections (`--sections`, comma-separated; a section whose module is missing is skipped with a note):
`tasks` (per-stage latency of every task on the Runtime, TTFT/TPOT, prefix-cache miss vs hit, inline
images, 1 vs 8 concurrent explain streams, memory), `floor` (memory-bandwidth floor of batch-1 decoding
vs the measured step, with an ONNX Runtime profile when the target is missed), `image` (GenerateImage per
stage), `baselines` (upstream open-flamingo, our PyTorch reference, diffusers), `load` (gRPC sweep,
time to SERVING, server RSS) and `precision` (the `--variants LABEL=DIR ...` of `unimp quantize` side by
side; see Precision). Timings are medians after a warm-up; ratios are taken side by side in one
run, and the run records how busy the machine was with other work.
"""


# -- formatting -----------------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    v = 1e3 * float(seconds)
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def size(nbytes: float | None) -> str:
    if nbytes is None:
        return "–"
    b = float(nbytes)
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def num(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        a = abs(value)
        return f"{value:.0f}" if a >= 1000 else f"{value:.1f}" if a >= 10 else f"{value:.3g}"
    if value is None:
        return "–"
    return str(value).replace("|", "\\|").replace("\n", " ")


def table(header: Iterable[str], rows: Iterable[Iterable[Any]]) -> str:
    head = list(header)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(c if isinstance(c, str) else num(c) for c in row) + " |")
    return "\n".join(lines)


def _op(name: str) -> str:
    return ">=" if ">=" in name else "<=" if "<=" in name else ""


# -- Markdown -------------------------------------------------------------------------------------------


def render_conditions(results: dict[str, Any]) -> str:
    cfg, machine = results.get("config", {}), results.get("machine", {})
    load = machine.get("contention", {})
    mem = machine.get("mem_total_kb")
    lines = [
        f"- **Run**: `{results.get('command', 'unimp bench')}` on {results.get('started_at', '?')} "
        f"({results.get('duration_s', 0.0):.0f} s); preset `{cfg.get('preset')}`"
        f"{' (quick)' if cfg.get('quick') else ''}: {cfg.get('model', '?')} "
        f"({cfg.get('parameters', 0) / 1e6:.1f}M parameters), artifacts `{cfg.get('artifacts')}`; "
        f"ONNX Runtime CPU, {cfg.get('threads')} intra-op threads; {cfg.get('repeats')} timed "
        f"repeat{'' if cfg.get('repeats') == 1 else 's'} after a warm-up, medians.",
        f"- **Machine**: {machine.get('cpu_model', machine.get('processor', '?'))}, {machine.get('cpus')} CPUs"
        f"{f', {mem / 2**20:.0f} GiB' if mem else ''}; {machine.get('platform', '')}; Python {machine.get('python', '')}.",
    ]
    busy = {name: c.get("other_cores", 0.0) for name, c in results.get("section_contention", {}).items()
            if c.get("other_cores", 0.0) > SHARED_CORES}
    if load:
        shared = bool(load.get("shared"))
        lines.append(
            f"- **Other work on the machine**: {load.get('other_cores', 0.0):.2f} of {machine.get('cpus')} cores "
            f"busy with other processes on average during the run (load average {load.get('loadavg_start')} at "
            f"the start, {load.get('loadavg_end')} at the end): "
            + ("**other work overlapped some sections** (next line)." if busy
               else "**shared machine, timings are noisy and pessimistic**." if shared else "quiet machine.")
        )
    if busy:
        lines.append(
            "- **Sections that shared the CPUs**: "
            + ", ".join(f"`{n}` ({v:.2f} cores of other work on average)" for n, v in busy.items())
            + f"; on 2 cores with {cfg.get('threads')} ONNX Runtime threads, a descheduled thread stalls every "
            "operator, so these sections' absolute times are inflated and their ratios less reliable."
        )
    packages = results.get("packages", {})
    if packages:
        lines.append("- **Versions**: " + ", ".join(f"{k} {v}" for k, v in packages.items()) + ".")
    return "\n".join(lines)


def render_targets(results: dict[str, Any]) -> str:
    rows = []
    for t in results.get("targets", []):
        rows.append([
            t.get("section", ""), num(t.get("name")), num(t.get("value")), f"{_op(str(t.get('name')))} {num(t.get('target'))}",
            "**met**" if t.get("met") else "**missed**", num(t.get("note", "")),
        ])
    if not rows:
        return "No section reported a target."
    return table(["section", "target", "measured", "required", "result", "why / details"], rows)


def _step_scaling(conc: dict[str, Any]) -> str:
    """Per-stream TPOT growth with the stream count, and the runner's batched step cost when measured."""
    streams = conc.get("streams", {})
    if len(streams) < 2:
        return ""
    lo, hi = min(streams, key=int), max(streams, key=int)
    one, many = streams[lo].get("tpot_s") or 0.0, streams[hi].get("tpot_s") or 0.0
    if not one or not many:
        return ""
    n = int(hi) / int(lo)
    text = (f" Per-stream TPOT grows {many / one:.1f}x from {lo} to {hi} streams, so decode-phase tokens/s "
            f"rises only {n * one / many:.1f}x.")
    step = conc.get("runner_step_s", {})
    if step.get(lo) and step.get(hi):
        text += (f" The decoder step alone (runner, {conc.get('runner_step_context')} tokens of context): "
                 f"{ms(step[lo])} ms for {lo} row, {ms(step[hi])} ms for {hi} rows ({step[hi] / step[lo]:.1f}x).")
    return text


def render_tasks(r: dict[str, Any], h: str) -> str:
    out = [f"{h} Per-task latency (ms, medians; miss = prefix-cache miss, hit = history prefix cached)", ""]
    rows = []
    for name, cond in r.get("tasks", {}).items():
        for label in ("miss", "hit"):
            s = cond.get(label, {})
            rows.append([
                TASK_LABELS.get(name, name), label, ms(s.get("vision_s")), ms(s.get("prefill_s")),
                ms(s.get("decode_s")) if s.get("tokens") else "–",
                ms(s.get("decode_per_token_s")) if s.get("tokens") else "–",
                ms(s.get("first_token_s")), ms(s.get("tpot_s")) if s.get("tokens") else "–",
                ms(s.get("total_s")), ms(s.get("wall_s")),
            ])
    out.append(table(["task", "cache", "vision", "prefill", "decode", "per token", "TTFT", "TPOT", "total",
                      "wall"], rows))
    n = r.get("explain_new_tokens")
    out.append("")
    out.append(f"Explain decodes {n} new tokens greedily after the rating. Vision = the images' cross-attention "
               "K/V (catalog images from the precomputed store, inline images encoded now); TTFT = first streamed "
               "text (recommendation, search and selection answer from the prefill logits).")
    pc = r.get("prefix_cache", {})
    if pc:
        tok = pc.get("explain_prompt_tokens", {})
        out += ["", f"{h} Prefix cache: time to first token", "",
                table(["task", "TTFT miss", "TTFT hit", "hit / miss"],
                      [[TASK_LABELS.get(k, k), ms(r["tasks"][k]["miss"]["first_token_s"]),
                        ms(r["tasks"][k]["hit"]["first_token_s"]), f"{v:.2f}"]
                       for k, v in pc.get("per_task_ratio", {}).items()]),
                "", f"Explain prompt: {tok.get('prompt')} tokens, of which {tok.get('prefix')} are the cached "
                f"history prefix and {tok.get('suffix')} (target item and question) are prefilled on a hit. "
                f"Every request, hit or miss, also reads the stored cross-attention K/V of its "
                f"{pc.get('media_kv_images')} images: {ms(pc.get('media_kv_s'))} ms."]
    img = r.get("inline_image", {})
    if img:
        out += ["", f"{h} Catalog latents vs an image encoded at request time (recommendation, cache miss)", "",
                table(["history images from", "vision", "total"],
                      [["catalog (precomputed latents)", ms(img["catalog"]["vision_s"]), ms(img["catalog"]["total_s"])],
                       [f"inline bytes ({img.get('images')} images)", ms(img["inline"]["vision_s"]),
                        ms(img["inline"]["total_s"])]]),
                "", f"Encoding one image at request time costs {ms(img.get('encode_per_image_s'))} ms."]
    conc = r.get("concurrency", {})
    if conc:
        rows = [[k, f"{v['tokens_per_s']:.1f}", f"{v['mean_batch_rows']:.1f}", ms(v["ttft_s"]), ms(v["tpot_s"])]
                for k, v in conc.get("streams", {}).items()]
        out += ["", f"{h} Explain throughput through continuous batching ({conc.get('max_new_tokens')} tokens "
                "per stream, prefixes cached)", "",
                table(["streams", "tokens/s", "mean decode batch (rows)", "TTFT ms", "TPOT ms"], rows),
                "", f"Speed-up at {max(int(k) for k in conc.get('streams', {'1': 0}))} streams: "
                f"{conc.get('speedup', 0.0):.2f}x (tokens/s over the wall time of all streams, prefills "
                "included)." + _step_scaling(conc)]
    mem = r.get("memory", {})
    if mem:
        out += ["", f"{h} Memory", "", table(["what", "bytes"], [
            ["peak RSS of the benchmark process (tasks section)", size(mem.get("peak_rss_bytes"))],
            ["RSS before / after opening the Runtime",
             f"{size(mem.get('rss_before_open_bytes'))} / {size(mem.get('rss_after_open_bytes'))}"],
            ["weights: vision + media_kv + decoder graphs", size(mem.get("weights_bytes_text"))],
            ["weights: diffusion graphs", size(mem.get("weights_bytes_diffusion"))],
            ["KV cache per token (all layers, K and V)", size(mem.get("kv_bytes_per_token"))],
            ["peak KV held by decoding requests (engine stats)", size(mem.get("kv_bytes_peak"))],
            ["peak prefix-cache bytes", size(mem.get("prefix_cache_bytes_peak"))],
        ])]
    return "\n".join(out)


def render_floor(r: dict[str, Any], h: str) -> str:
    bw, dec = r.get("bandwidth", {}), r.get("decoder", {})
    w = dec.get("weights", {})
    rows = [
        ["read bandwidth", f"{bw.get('gb_s', 0.0):.1f} GB/s ({bw.get('method')}, {bw.get('threads')} thread(s), "
         f"best of {bw.get('repeats')}); copy bandwidth {bw.get('copy_gb_s', 0.0):.1f} GB/s (read + write)"],
        ["decoder weights read per token", f"{size(w.get('per_token'))} ({w.get('source')}; "
         f"{size(w.get('gathered'))} of gathered embedding tables count one row)"],
        ["KV read per token", f"{size(dec.get('kv_bytes_read'))} at {dec.get('context_tokens')} tokens of "
         f"context + {size(dec.get('xattn_memory_bytes'))} cross-attention memory (one image)"],
        ["floor = bytes / bandwidth", f"{ms(r.get('floor_s'))} ms per token"],
    ]
    for layout, lr in r.get("layouts", {}).items():
        if "per_token_s" not in lr:
            rows.append([f"{layout} KV layout", str(lr.get("skipped", "not measured"))])
            continue
        rows += [
            [f"{layout} KV layout: measured per token (batch 1, decoder core)", f"{ms(lr.get('per_token_s'))} ms "
             f"median (min {ms(lr.get('per_token_min_s'))}) over {r.get('steps')} steps after a "
             f"{r.get('prompt_tokens')}-token prefill; floor {ms(lr.get('floor_s'))} ms"],
            ["  inside the session / Python outside", f"{ms(lr.get('session_run_s'))} / {ms(lr.get('python_overhead_s'))} ms"],
            ["  ratio measured / floor", f"{lr.get('ratio', 0.0):.2f}x"],
        ]
    out = [f"{h} Decode vs the memory-bandwidth floor", "", table(["", "value"], rows)]
    prof = r.get("profile")
    if prof:
        out += ["", f"ONNX Runtime profile of {prof.get('steps')} decode steps ({prof.get('graph')}; "
                f"{prof.get('note')}):", "",
                table(["op type", "ms per step (profiled)", "share of kernel time"],
                      [[o["op"], ms(o["per_step_s"]), f"{o['share']:.0%}"] for o in prof.get("top_ops", [])])]
    return "\n".join(out)


def render_image(r: dict[str, Any], h: str) -> str:
    st = r.get("stages", {})
    order = ["prompt_s", "text_encoder_s", "unet_s", "unet_per_step_s", "vae_decoder_s", "total_s", "first_progress_s",
             "wall_s"]
    labels = {"prompt_s": "personalised prompt (LLM)", "text_encoder_s": "text encoder", "unet_s": "UNet (all steps)",
              "unet_per_step_s": "UNet per step", "vae_decoder_s": "VAE decoder", "total_s": "diffusion total",
              "first_progress_s": "first progress event", "wall_s": "wall (whole request)"}
    rows = [[labels[k], ms(st[k])] for k in order if k in st]
    out = []
    if rows:
        out += [f"{h} Image generation, diffusion ({r.get('steps')} steps, {r.get('width')}x{r.get('height')}, "
                f"medians of {r.get('repeats')})", "", table(["stage", "ms"], rows)]
    vq = r.get("vqgan", {})
    if vq.get("stages"):
        vst = vq["stages"]
        vlabels = {"prompt_s": "prompt (history codes from the cache)", "vision_s": "history latents",
                   "prefill_s": "prefill", "codes_s": f"{vq.get('codes')} code tokens",
                   "vqgan_decoder_s": "VQGAN decoder", "wall_s": "wall (whole request)"}
        vrows = [[vlabels[k], ms(vst[k])] for k in vlabels if k in vst]
        out += ["", f"{h} Image generation, VQGAN codes ({vq.get('width')}x{vq.get('height')}, "
                f"medians of {vq.get('repeats')}): {vq.get('codes_per_s', 0.0):.0f} codes/s, decoder "
                f"{vq.get('decoder_ms', 0.0):.1f} ms", "", table(["stage", "ms"], vrows)]
    return "\n".join(out).strip("\n")


def _flatten(value: Any, prefix: str = "", depth: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(value, dict) and depth > 0:
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k), depth - 1))
    elif not isinstance(value, dict | list):
        out[prefix] = value
    return out


def _lists(value: Any, path: str = "") -> list[tuple[str, list[dict[str, Any]]]]:
    found: list[tuple[str, list[dict[str, Any]]]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k != "targets":
                found += _lists(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
        found.append((path, value))
    return found


def render_generic(r: dict[str, Any], h: str, max_columns: int = 12) -> str:
    """Any section's numbers: scalar leaves as one table, each list of records as another."""
    out = []
    scalars = {k: v for k, v in _flatten({k: v for k, v in r.items() if k != "targets"}).items()}
    if scalars:
        out += [table(["metric", "value"], [[k, v] for k, v in scalars.items()])]
    for path, records in _lists(r):
        flat = [_flatten(x, depth=3) for x in records]
        columns = list(dict.fromkeys(k for f in flat for k in f))
        more = len(columns) > max_columns
        columns = columns[:max_columns]
        out += ["", f"`{path}`" + (" (first columns; all of them in results.json)" if more else ""), "",
                table(columns, [[f.get(c) for c in columns] for f in flat])]
    return "\n".join(out)


SectionRenderer = Callable[[dict[str, Any], str], str]
RENDERERS: dict[str, SectionRenderer] = {"tasks": render_tasks, "floor": render_floor, "image": render_image}
TITLES = {"baselines": "Baselines", "load": "Serving under load"}


def _renderer(name: str) -> SectionRenderer | None:
    if name in RENDERERS:
        return RENDERERS[name]
    try:
        module = importlib.import_module(f"benchmarks.{name}")
    except ImportError:
        return None
    fn = getattr(module, "render_markdown", None)
    return fn if callable(fn) else None


def render_body(results: dict[str, Any], level: int = 2, plot_dir: str = "plots", compact: bool = False) -> str:
    """Everything below the title: conditions, targets, each section, the plots.

    ``compact`` (the README) leaves out the generic tables of sections without a renderer of their own;
    their targets stay in the targets table and every number stays in results.json / results.md.
    """
    h = "#" * level
    out = [render_conditions(results), "", f"{h} Targets", "", render_targets(results)]
    contention = results.get("section_contention", {})
    summarised = []
    for name, r in results.get("sections", {}).items():
        if not isinstance(r, dict) or "skipped" in r or "error" in r:
            continue
        fn = _renderer(name)
        text = None
        if fn is not None:
            try:
                text = fn(r, h)
            except Exception as exc:  # a renderer that does not match its data: fall back to the numbers
                log.warning("rendering section %s failed (%s: %s); using the generic tables", name,
                            type(exc).__name__, exc)
        if text is None and compact:
            summarised.append(name)
            continue
        if text is None:
            text = f"{h} {TITLES.get(name, name.capitalize())}\n\n{render_generic(r, h)}"
        other = contention.get(name, {}).get("other_cores", 0.0)
        if other > SHARED_CORES:  # under the section's heading
            head, _, rest = text.partition("\n")
            text = (f"{head}\n\n_Measured while other processes kept {other:.2f} cores busy on average: absolute "
                    f"times in this section are inflated._\n{rest}")
        out += ["", text]
    if summarised:
        out += ["", "Every number of " + ", ".join(f"`{n}`" for n in summarised)
                + " is in `results.json` and `results.md` of the run (its targets are in the table above)."]
    notes = [(n, r) for n, r in results.get("sections", {}).items() if isinstance(r, dict) and ("skipped" in r or "error" in r)]
    if notes:
        out += ["", f"{h} Sections not measured", ""]
        out += [f"- `{n}`: " + (f"skipped: {r['skipped']}" if "skipped" in r else f"**error**: {num(r['error'])}")
                for n, r in notes]
    plots = results.get("plots", [])
    if plots:
        out += ["", f"{h} Plots", ""]
        out += [f"![{Path(p).stem.replace('_', ' ')}]({plot_dir}/{Path(p).name})" for p in plots]
    return "\n".join(out) + "\n"


def render_markdown(results: dict[str, Any]) -> str:
    """The full results.md."""
    return "# UniMP Edge benchmarks\n\n" + render_body(results, level=2, plot_dir="plots")


# -- plots ----------------------------------------------------------------------------------------------


def _find_sweep(value: Any) -> list[dict[str, Any]] | None:
    """The first list of records keyed by ``concurrency`` anywhere in a section's results."""
    if isinstance(value, list) and value and all(isinstance(x, dict) and "concurrency" in x for x in value):
        return value
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    for child in children:
        found = _find_sweep(child)
        if found:
            return found
    return None


def _as_ms(key: str, value: float) -> float:
    return float(value) * (1e3 if key.endswith("_s") else 1.0)


def _p99_ms(record: dict[str, Any]) -> dict[str, float]:
    """p99 latency (ms) of a sweep level: its own, or one per RPC where the level nests them by name."""
    for key, v in record.items():
        if "p99" in key and isinstance(v, int | float) and not isinstance(v, bool):
            return {"all": _as_ms(key, v)}
    out: dict[str, float] = {}
    for sub in record.values():
        if isinstance(sub, dict) and sub and all(isinstance(x, dict) for x in sub.values()):
            for rpc, fields in sub.items():
                for key, v in fields.items():
                    if "p99" in key and isinstance(v, int | float) and not isinstance(v, bool):
                        out[str(rpc)] = _as_ms(key, v)
                        break
    return out


def _column_series(value: dict[str, Any]) -> dict[str, list[float]] | None:
    """{"concurrency": [...], "throughput*": [...], "p99*": [...]} -> lists in ms and requests/s."""
    xs = value.get("concurrency")
    if not isinstance(xs, list) or not xs:
        return None
    out: dict[str, list[float]] = {"concurrency": [float(x) for x in xs]}
    for key, v in value.items():
        if not isinstance(v, list) or len(v) != len(xs) or not all(isinstance(x, int | float) for x in v):
            continue
        if "throughput" in key or key in ("rps", "qps"):
            out["throughput"] = [float(x) for x in v]
        elif "p99" in key:
            out["p99_ms"] = [_as_ms(key, x) for x in v]
    return out


def load_series(load: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """Throughput and p99 per concurrency level from the load section: its ``plots`` columns (overall and
    per RPC) when present, else the first list of records keyed by ``concurrency``."""
    out: dict[str, dict[str, list[float]]] = {}
    plots = load.get("plots")
    if isinstance(plots, dict):
        for value in plots.values():
            if not isinstance(value, dict):
                continue
            direct = _column_series(value)
            if direct:
                out["all"] = direct
                continue
            for name, sub in value.items():
                sr = _column_series(sub) if isinstance(sub, dict) else None
                if sr:
                    out[str(name)] = sr
    if out:
        return out
    sweep = _find_sweep(load)
    if not sweep:
        return {}
    xs = [float(r["concurrency"]) for r in sweep]
    tput_key = next((k for k in sweep[0] if "throughput" in k or k in ("rps", "qps")), None)
    if tput_key:
        out["all"] = {"concurrency": xs, "throughput": [float(r.get(tput_key) or 0.0) for r in sweep]}
    lines: dict[str, list[float]] = {}
    for r in sweep:
        for rpc, v in _p99_ms(r).items():
            lines.setdefault(rpc, []).append(v)
    for rpc, vs in lines.items():
        if len(vs) == len(xs):
            out.setdefault(rpc, {"concurrency": xs})["p99_ms"] = vs
    return out


def write_plots(results: dict[str, Any], directory: Path) -> list[str]:
    """Draw every plot the results allow into ``directory``; returns the file names written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib); no plots")
        return []
    directory.mkdir(parents=True, exist_ok=True)
    sections = results.get("sections", {})
    written: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(directory / name, dpi=110)
        plt.close(fig)
        written.append(name)

    title = f"{results.get('config', {}).get('model', '')}, {results.get('config', {}).get('threads')} threads"
    tasks = sections.get("tasks", {})
    if isinstance(tasks, dict) and tasks.get("tasks"):
        labels, bottoms = [], []
        values: dict[str, list[float]] = {s: [] for s in STAGES}
        for name, cond in tasks["tasks"].items():
            for label in ("miss", "hit"):
                s = cond[label]
                labels.append(f"{name}\n{label}")
                for stage in STAGES:
                    values[stage].append(1e3 * s.get(f"{stage}_s", 0.0))
        fig, ax = plt.subplots(figsize=(9, 4.5))
        bottoms = [0.0] * len(labels)
        for stage in STAGES:
            ax.bar(labels, values[stage], bottom=bottoms, label=stage)
            bottoms = [b + v for b, v in zip(bottoms, values[stage])]
        ax.set_ylabel("ms (median)")
        ax.set_title(f"Latency by stage per task (prefix-cache miss / hit) - {title}")
        ax.legend()
        ax.tick_params(axis="x", labelsize=8)
        save(fig, "latency_breakdown.png")

        ratios = tasks.get("prefix_cache", {}).get("per_task_ratio", {})
        names = list(ratios)
        fig, ax = plt.subplots(figsize=(7, 4))
        pos = list(range(len(names)))
        miss = [1e3 * tasks["tasks"][n]["miss"]["first_token_s"] for n in names]
        hit = [1e3 * tasks["tasks"][n]["hit"]["first_token_s"] for n in names]
        ax.bar([x - 0.2 for x in pos], miss, width=0.4, label="cold (prefix-cache miss)")
        ax.bar([x + 0.2 for x in pos], hit, width=0.4, label="prefix-cache hit")
        ax.set_xticks(pos, names)
        ax.set_ylabel("time to first token, ms")
        ax.set_title(f"TTFT cold vs prefix hit - {title}")
        ax.legend()
        save(fig, "ttft_prefix_cache.png")

        streams = tasks.get("concurrency", {}).get("streams", {})
        if streams:
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.bar([f"{k} stream(s)" for k in streams], [v["tokens_per_s"] for v in streams.values()])
            ax.set_ylabel("explain tokens/s (all streams)")
            ax.set_title(f"Continuous batching - {title}", fontsize=9)
            save(fig, "explain_streams.png")

    floor = sections.get("floor", {})
    if isinstance(floor, dict) and "floor_s" in floor:
        fig, ax = plt.subplots(figsize=(6, 4))
        inside, outside = 1e3 * floor["session_run_s"], 1e3 * floor["python_overhead_s"]
        ax.bar(["bandwidth floor"], [1e3 * floor["floor_s"]], color="grey")
        ax.bar(["measured"], [inside], label="inside session.run")
        ax.bar(["measured"], [outside], bottom=[inside], label="Python outside session.run")
        ax.set_ylabel("ms per token (batch 1)")
        ax.set_title(f"Decode step vs floor ({floor['ratio']:.2f}x) - {title}", fontsize=9)
        ax.legend()
        save(fig, "decode_floor.png")

    load = sections.get("load", {})
    series = load_series(load) if isinstance(load, dict) else {}
    if series:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
        levels: set[float] = set()
        for label, sr in series.items():
            style, name = ("o-", "all RPCs (mixed)") if label == "all" else (".--", label)
            levels.update(sr["concurrency"])
            if sr.get("throughput"):
                left.plot(sr["concurrency"], sr["throughput"], style, label=name)
            if sr.get("p99_ms"):
                right.plot(sr["concurrency"], sr["p99_ms"], style, label=name)
        left.set_xlabel("concurrent clients")
        left.set_ylabel("successful requests/s")
        left.set_title("throughput vs concurrency", fontsize=9)
        right.set_xlabel("concurrent clients")
        right.set_ylabel("p99 latency, ms")
        right.set_yscale("log")
        right.set_title("p99 latency vs concurrency", fontsize=9)
        ticks = sorted(levels)
        for ax in (left, right):
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
            ax.legend(fontsize=7)
        fig.suptitle(f"gRPC load sweep - {title}", fontsize=10)
        save(fig, "load_throughput_p99.png")

    image = sections.get("image", {})
    if isinstance(image, dict) and image.get("stages"):
        st = image["stages"]
        keys = [k for k in ("prompt_s", "text_encoder_s", "unet_s", "vae_decoder_s") if k in st]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.bar([k[:-2] for k in keys], [1e3 * st[k] for k in keys])
        ax.set_ylabel("ms (median)")
        ax.set_title(f"GenerateImage by stage ({image.get('steps')} steps) - {title}", fontsize=9)
        save(fig, "image_stages.png")
    return written


# -- README ---------------------------------------------------------------------------------------------


def readme_block(results: dict[str, Any], plot_dir: str) -> str:
    return f"{START_MARKER}\n{render_body(results, level=3, plot_dir=plot_dir, compact=True)}{END_MARKER}"


def update_readme(results: dict[str, Any], plots: Path, readme: Path, docs: Path) -> None:
    """Copy the plots to ``docs`` and put the rendered results into the README's Performance section."""
    docs.mkdir(parents=True, exist_ok=True)
    for name in results.get("plots", []):
        shutil.copy2(plots / name, docs / name)
    rel = docs.resolve().relative_to(readme.resolve().parent).as_posix()
    block = readme_block(results, rel)
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if START_MARKER in text and END_MARKER in text:
        head, rest = text.split(START_MARKER, 1)
        tail = rest.split(END_MARKER, 1)[1]
        text = head + block + tail
    else:
        section = f"{README_HEADING}\n\n{PERFORMANCE_INTRO}\n{block}\n"
        lines = text.splitlines(keepends=True)
        start = next((i for i, ln in enumerate(lines) if ln.rstrip() == README_HEADING), None)
        if start is None:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
            text = "".join(lines[:start]) + section + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="render a results.json from `unimp bench` again")
    parser.add_argument("results", type=Path, help="results.json written by `unimp bench`")
    parser.add_argument("--update-readme", action="store_true",
                        help=f"copy the plots to docs/bench/ and replace the README between {START_MARKER} and {END_MARKER}")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md")
    parser.add_argument("--docs", type=Path, default=REPO_ROOT / "docs" / "bench")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text(encoding="utf-8"))
    out = args.results.parent
    results["plots"] = write_plots(results, out / "plots")
    (out / "results.md").write_text(render_markdown(results), encoding="utf-8")
    print(f"wrote {out / 'results.md'} and {len(results['plots'])} plots")
    if args.update_readme:
        update_readme(results, out / "plots", args.readme, args.docs)
        print(f"updated {args.readme} and {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
