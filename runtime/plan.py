"""``unimp plan``: the memory budget of serving an artifacts directory on a board, before deploying it.

Every line is either read from the artifacts (graph file sizes, the manifest's dimensions, the catalog's
image count) or derived with the formulas the runtime itself uses (``runtime.engine.pool_rows`` and
``pool_row_bytes`` for the KV pool, the stores' per-image shapes for the catalog latents and K/V); lines
that are not (another precision's weights, the runtime overhead, the OS share) say ``estimate``. The
serving settings default to ``unimp serve``'s (``[engine]`` and ``[limits]`` of the server config, or the
TOML file given), so the plan describes the server those settings start.

On a unified-memory board (Jetson) every line draws on the one memory pool. On a discrete GPU the
weights, KV pool and scratch are on the device; the catalog stores, the prefix cache and the Python process
are in host memory and are checked against the board's assumed host RAM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from runtime.boards import GB, Board
from runtime.manifest import Manifest, load_manifest

if TYPE_CHECKING:  # runtime.engine is imported when a plan is made, not when the CLI parser is built
    from runtime.engine import RuntimeConfig

Precision = Literal["fp32", "fp16", "int8", "int4"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "fp16", "int8", "int4")

WEIGHT_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
"""Bytes per weight of each precision for the scaled estimate (int4: 4 bits plus one float32 scale per block of
32, `unimp quantize`'s default block size). Real quantized files are larger: embeddings, norms and biases keep
their precision."""
QUANTIZED_GRAPHS = ("decoder", "media_kv", "vision")
"""Graphs `unimp quantize` rewrites for int8 / int4 (the diffusion and VQGAN graphs stay as exported)."""
DIFFUSION_GRAPHS = ("text_encoder", "unet", "vae_decoder")
VQGAN_GRAPHS = ("vqgan_encoder", "vqgan_decoder")

PROCESS_BYTES = 400 * 10**6
"""Python interpreter, numpy, onnxruntime, gRPC and the tokenizer (estimate with headroom: a process with the
server modules imported and the tiny demo opened peaked at 119 MB RSS on x86, AMD EPYC, onnxruntime 1.32 CPU;
a GPU provider's CUDA / cuDNN / TensorRT libraries add to it by an amount not measured here)."""
GPU_CONTEXT_BYTES = 600 * 10**6
"""CUDA context plus cuBLAS / cuDNN / TensorRT libraries and workspaces on a GPU path (estimate, unverified)."""
SCRATCH_FRACTION = 0.10
SCRATCH_MIN_BYTES = 256 * 10**6
"""Activation scratch of the engines: a tenth of the weights, at least 256 MB (estimate; TensorRT reports the
real figure per engine as its device memory size)."""


class PlanError(ValueError):
    """A plan setting the artifacts cannot serve (the message starts with the option's name)."""


@dataclass(frozen=True)
class Line:
    name: str
    bytes: int
    where: Literal["device", "host"]
    """device: GPU memory (the whole pool on a unified board); host: host RAM on a discrete GPU."""
    group: str
    """weights, kv, catalog, runtime."""
    estimate: bool
    note: str = ""


@dataclass(frozen=True)
class PlanSettings:
    precision: Precision | None = None
    """None: as exported."""
    slots: int | None = None
    """KV pool rows; None: what `unimp serve` allocates (runtime.engine.pool_rows)."""
    context: int | None = None
    """Serving maximum context; None: engine.max_context (0: the model's positions)."""
    diffusion_resident: bool = True
    reserved_bytes: int | None = None
    """OS share; None: the board's."""


@dataclass
class Plan:
    artifacts: str
    model: str
    board: Board
    settings: PlanSettings
    precision: str
    exported_precision: dict[str, str]
    slots: int
    context: int
    kv_layout: str
    kv_dtype: str
    catalog_images: int
    lines: list[Line]
    reserved_bytes: int
    notes: list[str] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)

    # -- totals -----------------------------------------------------------------------------------
    @property
    def device_bytes(self) -> int:
        return sum(line.bytes for line in self.lines if line.where == "device")

    @property
    def host_bytes(self) -> int:
        return sum(line.bytes for line in self.lines if line.where == "host")

    @property
    def budget_bytes(self) -> int:
        return max(0, self.board.total_memory - self.reserved_bytes)

    @property
    def host_budget_bytes(self) -> int:
        return max(0, self.board.host_memory - self.reserved_host_bytes) if not self.board.unified_memory else 0

    @property
    def reserved_host_bytes(self) -> int:
        """A discrete-GPU host keeps about 2 GB for its OS (estimate)."""
        return 2 * GB if not self.board.unified_memory else 0

    @property
    def fits_device(self) -> bool:
        return self.device_bytes <= self.budget_bytes

    @property
    def fits_host(self) -> bool:
        return self.board.unified_memory or self.host_bytes <= self.host_budget_bytes

    @property
    def fits(self) -> bool:
        return self.fits_device and self.fits_host

    def group_bytes(self, group: str) -> int:
        return sum(line.bytes for line in self.lines if line.group == group)

    def to_dict(self) -> dict[str, Any]:
        board = asdict(self.board)
        board["budget_bytes"] = self.board.budget_bytes
        return {
            "artifacts": self.artifacts,
            "model": self.model,
            "board": board,
            "precision": self.precision,
            "exported_precision": self.exported_precision,
            "slots": self.slots,
            "context": self.context,
            "kv_layout": self.kv_layout,
            "kv_dtype": self.kv_dtype,
            "catalog_images": self.catalog_images,
            "diffusion_resident": self.settings.diffusion_resident,
            "lines": [asdict(line) for line in self.lines],
            "reserved_bytes": self.reserved_bytes,
            "device_bytes": self.device_bytes,
            "device_budget_bytes": self.budget_bytes,
            "host_bytes": self.host_bytes,
            "host_budget_bytes": self.host_budget_bytes,
            "fits": self.fits,
            "fits_device": self.fits_device,
            "fits_host": self.fits_host,
            "notes": self.notes,
            "suggestions": self.suggestions,
        }


# -- reading the artifacts ------------------------------------------------------------------------------


def graph_file_bytes(root: Path, file: str) -> int:
    """Bytes on disk of a graph: the .onnx file plus its external-data file (``<file>.data``) if any."""
    path = root / file
    size = path.stat().st_size if path.is_file() else 0
    data = path.with_name(path.name + ".data")
    if data.is_file():
        size += data.stat().st_size
    return size


def catalog_images(root: Path, manifest: Manifest) -> int:
    """Catalog items with an image (each has latents and cross-attention K/V in the stores)."""
    path = root / manifest.catalog
    count = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip() and json.loads(line).get("image"):
                count += 1
    return count


def latent_bytes_per_image(manifest: Manifest) -> int:
    """One image's media latents as the latent store keeps them: (num_latents, width)."""
    from runtime.vision.encoder import LATENT_DTYPE

    return manifest.vision.num_latents * manifest.vision.width * np.dtype(LATENT_DTYPE).itemsize


def media_kv_bytes_per_image(manifest: Manifest) -> int:
    """One image's cross-attention K/V as the K/V store keeps them: (blocks, 2, h, n, dh)."""
    from runtime.vision.media_kv import KV_DTYPE

    d = manifest.decoder
    blocks = len(d.xattn_layers)
    return blocks * 2 * d.xattn_heads * manifest.vision.num_latents * d.xattn_head_dim * np.dtype(KV_DTYPE).itemsize


# -- the plan -------------------------------------------------------------------------------------------


def _weights(root: Path, manifest: Manifest, precision: Precision | None, diffusion_resident: bool,
             where: Literal["device", "host"]) -> list[Line]:
    lines = []
    for name, entry in manifest.graphs.items():
        if not diffusion_resident and name in (*DIFFUSION_GRAPHS, *VQGAN_GRAPHS):
            continue
        size = graph_file_bytes(root, entry.file)
        target = precision
        if precision in ("int8", "int4") and name not in QUANTIZED_GRAPHS:
            target = None  # `unimp quantize` keeps it as exported
        if target is None or target == entry.precision:
            lines.append(Line(f"weights: {name}", size, where, "weights", False,
                              f"{entry.file}, {entry.precision} (file size)"))
            continue
        scaled = int(size * WEIGHT_BYTES[target] / WEIGHT_BYTES[entry.precision])
        lines.append(Line(f"weights: {name}", scaled, where, "weights", True,
                          f"{entry.file} {entry.precision} {size} B scaled to {target}"))
    return lines


def kv_split(manifest: Manifest, context: int, itemsize: int) -> tuple[int, int]:
    """(self-attention K/V, last-image cross-attention K/V) bytes of one pool row at ``itemsize`` bytes per value;
    at float32 their sum is ``runtime.engine.pool_row_bytes``."""
    from runtime.engine import pool_row_bytes

    d = manifest.decoder
    row = pool_row_bytes(manifest, context)  # float32
    memory = 4 * 2 * len(d.xattn_layers) * d.xattn_heads * manifest.vision.num_latents * d.xattn_head_dim
    return (row - memory) * itemsize // 4, memory * itemsize // 4


def make_plan(root: str | Path, board: Board, settings: PlanSettings | None = None,
              config: RuntimeConfig | None = None) -> Plan:
    """The budget of serving ``root`` on ``board``; ``config``: the server's engine settings (default:
    `unimp serve`'s defaults)."""
    from runtime.engine import RuntimeConfig, SettingsError, context_of, pool_rows

    root = Path(root)
    settings = settings or PlanSettings()
    config = config or RuntimeConfig()
    manifest = load_manifest(root, verify=False)
    if settings.precision is not None and settings.precision not in PRECISIONS:
        raise PlanError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {settings.precision!r}")
    if settings.context is not None:
        if not 1 <= settings.context <= manifest.decoder.max_positions:
            raise PlanError(f"--context: must be in 1..{manifest.decoder.max_positions} (the model's positions), "
                            f"got {settings.context}")
        config = replace(config, max_context=settings.context)
    try:
        context = context_of(manifest, config)
    except ValueError as exc:
        raise PlanError(f"engine.{exc}") from exc
    if settings.slots is not None:
        if settings.slots < 1:
            raise PlanError(f"--slots: must be >= 1, got {settings.slots}")
        slots = settings.slots
    else:
        try:
            slots = pool_rows(manifest, config, board.total_memory)
        except SettingsError as exc:
            raise PlanError(f"engine.{exc}") from exc
    reserved = board.reserved_bytes if settings.reserved_bytes is None else settings.reserved_bytes
    device: Literal["device", "host"] = "device"
    host: Literal["device", "host"] = "device" if board.unified_memory else "host"

    lines = _weights(root, manifest, settings.precision, settings.diffusion_resident, device)
    kv_estimate = settings.precision == "fp16" and manifest.kv_dtype != "float16"
    kv_dtype = "float16" if settings.precision == "fp16" else manifest.kv_dtype
    itemsize = np.dtype(kv_dtype).itemsize
    self_kv, last_image = kv_split(manifest, context, itemsize)
    d = manifest.decoder
    lines.append(Line("kv pool: self-attention K/V", slots * self_kv, device, "kv", kv_estimate,
                      f"2 x {d.num_layers} layers x {d.num_heads} heads x {d.head_dim} x {context + 1} positions "
                      f"(context {context} + 1 scratch) x {slots} rows x {itemsize} B ({kv_dtype})"))
    lines.append(Line("kv pool: last-image cross-attention K/V", slots * last_image, device, "kv", kv_estimate,
                      f"2 x {len(d.xattn_layers)} blocks x {d.xattn_heads} heads x {manifest.vision.num_latents} "
                      f"latents x {d.xattn_head_dim} x {slots} rows x {itemsize} B"))
    images = catalog_images(root, manifest)
    lines.append(Line("catalog: media latents", images * latent_bytes_per_image(manifest), host, "catalog", False,
                      f"{images} images x {latent_bytes_per_image(manifest)} B (memory-mapped store)"))
    lines.append(Line("catalog: cross-attention K/V", images * media_kv_bytes_per_image(manifest), host, "catalog",
                      False, f"{images} images x {media_kv_bytes_per_image(manifest)} B (memory-mapped store)"))
    if config.prefix_cache_bytes:
        lines.append(Line("prefix cache (LRU budget)", config.prefix_cache_bytes, host, "runtime", False,
                          "engine.prefix_cache_bytes"))
    weights = sum(line.bytes for line in lines if line.group == "weights")
    scratch = max(SCRATCH_MIN_BYTES, int(SCRATCH_FRACTION * weights))
    lines.append(Line("engine activation scratch", scratch, device, "runtime", True,
                      f"max({SCRATCH_MIN_BYTES // 10**6} MB, {SCRATCH_FRACTION:.0%} of the weights)"))
    lines.append(Line("CUDA context and GPU libraries", GPU_CONTEXT_BYTES, device, "runtime", True, ""))
    lines.append(Line("Python process (interpreter, onnxruntime, gRPC)", PROCESS_BYTES, host, "runtime", True, ""))

    exported: dict[str, str] = {name: entry.precision for name, entry in manifest.graphs.items()}
    plan = Plan(
        artifacts=str(root), model=manifest.model_name, board=board, settings=settings,
        precision=settings.precision or "as exported", exported_precision=exported, slots=slots, context=context,
        kv_layout=d.kv_layout, kv_dtype=kv_dtype, catalog_images=images, lines=lines, reserved_bytes=reserved,
    )
    plan.notes.extend(_notes(plan, manifest, config))
    return plan


def _notes(plan: Plan, manifest: Manifest, config: RuntimeConfig) -> list[str]:
    notes = list(plan.board.notes)
    if plan.kv_layout == "concat":
        pool = next(line.bytes for line in plan.lines if line.name == "kv pool: self-attention K/V")
        notes.append("concat KV layout: each sequence's cache grows step by step up to the pool figure, and a step "
                     "holds past and present at once (up to twice the self-attention K/V of the rows stepping); with a GPU "
                     "provider both sets are allocated at startup (the KV stays on the device in two alternating "
                     f"buffer sets, each at most the pool figure): add up to {pool / 1e6:.2f} MB for cuda / tensorrt")
    if any(line.estimate and line.group == "weights" for line in plan.lines):
        notes.append("scaled weights are estimates: run `unimp quantize` (int8 / int4) or build the fp16 engines and "
                     "plan the result for file sizes")
    if plan.slots < config.limits.max_beams:
        notes.append(f"{plan.slots} KV rows are fewer than limits.max_beams ({config.limits.max_beams}): `unimp "
                     "serve` refuses such a pool; lower limits.max_beams too")
    if plan.settings.slots is None:
        notes.append(f"{plan.slots} KV rows: engine.max_active {config.max_active} + limits.max_beams "
                     f"{config.limits.max_beams} - 1, as `unimp serve` allocates them (--slots to change)")
    for stack in plan.board.stacks:
        if stack.note:
            notes.append(f"{stack.name}: {stack.note}")
    return notes


def _fits_with(root: Path, board: Board, settings: PlanSettings, config: RuntimeConfig) -> bool:
    return make_plan(root, board, settings, config).fits


def suggest(plan: Plan, config: RuntimeConfig | None = None) -> list[str]:
    """What would make ``plan`` fit (each change tried alone, through ``make_plan``)."""
    from runtime.engine import RuntimeConfig, pool_row_bytes

    config = config or RuntimeConfig()
    root, board, s = Path(plan.artifacts), plan.board, plan.settings
    if plan.fits:
        return []
    out: list[str] = []
    current = s.precision or _widest(plan.exported_precision)
    for precision in PRECISIONS[PRECISIONS.index(current) + 1:] if current in PRECISIONS else ():
        if _fits_with(root, board, replace(s, precision=precision), config):
            out.append(f"lower precision: --precision {precision} fits (weights estimated)")
            break
    has_diffusion = any(g in plan.exported_precision for g in (*DIFFUSION_GRAPHS, *VQGAN_GRAPHS))
    if has_diffusion and s.diffusion_resident and _fits_with(root, board, replace(s, diffusion_resident=False),
                                                               config):
        out.append("diffusion not resident: without the diffusion / VQGAN graphs loaded it fits "
                   "(load them on demand, or serve GenerateImage elsewhere)")
    beams = config.limits.max_beams
    fewest = beams if plan.slots >= beams else 1
    if plan.slots > fewest and _fits_with(root, board, replace(s, slots=fewest), config):
        lo, hi = fewest, plan.slots  # the largest row count that fits: lo fits, hi does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if _fits_with(root, board, replace(s, slots=mid), config):
                lo = mid
            else:
                hi = mid
        out.append(f"fewer KV rows: --slots {lo} fits (engine.kv_pool_bytes "
                   f"{lo * pool_row_bytes(load_manifest(root, verify=False), plan.context)} for `unimp serve`; "
                   f"at least limits.max_beams = {beams})")
    if plan.context > 256 and _fits_with(root, board, replace(s, context=plan.context // 2), config):
        out.append(f"shorter context: --context {plan.context // 2} fits (engine.max_context)")
    if not out:
        out.append("no single change makes it fit: combine them, or choose a larger board")
    return out


def _widest(precisions: dict[str, str]) -> str:
    return min(precisions.values(), key=lambda p: PRECISIONS.index(p) if p in PRECISIONS else 0)


def plan_with_suggestions(root: str | Path, board: Board, settings: PlanSettings | None = None,
                          config: RuntimeConfig | None = None) -> Plan:
    plan = make_plan(root, board, settings, config)
    plan.suggestions = suggest(plan, config)
    return plan


# -- rendering --------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    return f"{n / 10**6:10.2f} MB"


def render(plan: Plan) -> str:
    b = plan.board
    cc = f"sm_{b.compute_capability[0]}{b.compute_capability[1]}" if b.compute_capability else "any"
    memory = "unified" if b.unified_memory else "discrete"
    lines = [
        f"plan: {plan.model} ({plan.artifacts}) on {b.name}: {b.description}",
        f"  board: {b.total_memory / GB:.0f} GB {memory} memory, {b.gpu_arch}, compute capability {cc}, "
        f"{b.dla_cores} DLA",
        "  software: " + "; ".join(f"{s.name}: TensorRT {s.tensorrt}, CUDA {s.cuda}, Python {s.python}"
                                   for s in b.stacks),
        f"  precision {plan.precision}, {plan.slots} KV rows x context {plan.context} ({plan.kv_layout} layout, "
        f"{plan.kv_dtype}), {plan.catalog_images} catalog images, diffusion "
        f"{'resident' if plan.settings.diffusion_resident else 'not resident'}",
        "",
    ]
    where_label = {"device": "unified" if b.unified_memory else "gpu", "host": "host"}
    for line in plan.lines:
        mark = "~" if line.estimate else " "
        lines.append(f"  {mark}{_mb(line.bytes)}  {where_label[line.where]:<7} {line.name:<48} {line.note}")
    lines.append("")
    label = "memory" if b.unified_memory else "GPU memory"
    lines.append(f"  total {label}: {plan.device_bytes / GB:.3f} GB of {plan.budget_bytes / GB:.3f} GB "
                 f"({b.total_memory / GB:.0f} GB minus {plan.reserved_bytes / GB:.2f} GB for the OS, estimate): "
                 f"{'fits' if plan.fits_device else 'DOES NOT FIT'} "
                 f"({(plan.budget_bytes - plan.device_bytes) / GB:+.3f} GB)")
    if not b.unified_memory:
        lines.append(f"  total host memory: {plan.host_bytes / GB:.3f} GB of {plan.host_budget_bytes / GB:.3f} GB "
                     f"(assumed {b.host_memory / GB:.0f} GB host RAM minus {plan.reserved_host_bytes / GB:.0f} GB): "
                     f"{'fits' if plan.fits_host else 'DOES NOT FIT'}")
    lines.append("  (~ = estimate: not read from the artifacts)")
    for note in plan.notes:
        lines.append(f"  note: {note}")
    for suggestion in plan.suggestions:
        lines.append(f"  suggestion: {suggestion}")
    lines.append("FITS" if plan.fits else "DOES NOT FIT")
    return "\n".join(lines)


def runtime_config_from_server(path: Path | None) -> RuntimeConfig:
    """The engine settings `unimp serve --config FILE` (or its defaults) runs with."""
    from runtime.engine import RuntimeConfig
    from runtime.server.config import load_config

    server = load_config(path)
    e = server.engine
    return RuntimeConfig(max_active=e.max_active, max_context=e.max_context, kv_pool_bytes=e.kv_pool_bytes,
                         prefix_cache_bytes=e.prefix_cache_bytes, limits=server.limits)


# -- command line -----------------------------------------------------------------------------------------


def add_plan_arguments(parser: Any) -> None:
    from runtime.boards import BOARDS

    parser.description = (
        "Print the memory budget of serving ART on a board: each graph's weights (file sizes; for another "
        "--precision a scaled estimate), the KV pool (rows x context, as `unimp serve` allocates it), the catalog "
        "latents and cross-attention K/V, the diffusion graphs, the runtime overhead and the OS share, against "
        "the board's memory; say what fits and what would make it fit. Serving settings default to `unimp "
        "serve`'s ([engine] max_active / max_context / kv_pool_bytes / prefix_cache_bytes, [limits] max_beams; "
        "--config FILE reads them from the server's TOML). Exit 0 when it fits, 1 when it does not, 2 for bad "
        "usage.")
    parser.add_argument("artifacts", type=Path, metavar="ART", help="artifacts directory written by `unimp export`")
    parser.add_argument("--board", required=True, choices=list(BOARDS), help="target board")
    parser.add_argument("--precision", choices=list(PRECISIONS), default=None,
                        help="weights precision to plan for (default: as exported; others are scaled estimates)")
    parser.add_argument("--slots", type=int, default=None, metavar="N",
                        help="KV pool rows, one per beam (default: engine.max_active + limits.max_beams - 1, "
                             "what `unimp serve` allocates)")
    parser.add_argument("--context", type=int, default=None, metavar="L",
                        help="serving maximum context in tokens (default: engine.max_context, 0 meaning the "
                             "model's positions)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="`unimp serve` TOML config to take the engine and limits settings from")
    parser.add_argument("--no-diffusion", action="store_true",
                        help="plan without the diffusion / VQGAN graphs resident")
    parser.add_argument("--reserve-gb", type=float, default=None, metavar="X",
                        help="memory kept for the OS / desktop in GB (default: the board's estimate)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def run_plan(args: Any) -> int:
    import sys

    from runtime.boards import get_board
    from runtime.manifest import ManifestError

    try:
        from runtime.server.config import ConfigError

        board = get_board(args.board)
        if args.reserve_gb is not None and args.reserve_gb < 0:
            raise PlanError(f"--reserve-gb: must be >= 0, got {args.reserve_gb}")
        reserved = None if args.reserve_gb is None else int(args.reserve_gb * GB)
        settings = PlanSettings(precision=args.precision, slots=args.slots, context=args.context,
                                diffusion_resident=not args.no_diffusion, reserved_bytes=reserved)
        config = runtime_config_from_server(args.config)
        plan = plan_with_suggestions(args.artifacts, board, settings, config)
    except (PlanError, ManifestError, ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0 if plan.fits else 1
