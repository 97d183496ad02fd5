"""The server's configuration: one TOML file, typed dataclasses, command-line overrides.

Precedence: field defaults < the TOML file (``--config``) < command-line flags. Every field carries its
documentation in ``metadata["help"]``; ``unimp serve --help`` is generated from it, so the help text
and this file cannot drift apart. Relative paths in a TOML file are resolved against the file's
directory. Example::

    host = "0.0.0.0"
    artifacts = "/srv/unimp/artifacts"
    state_dir = "/var/lib/unimp"

    [auth]
    admin_token = "..."            # catalog writes
    [auth.tokens]
    store-12 = "..."               # tenant name = bearer token

    [tls]
    cert = "server.crt"
    key = "server.key"
    client_ca = "clients-ca.crt"   # enables mutual TLS

    [metrics]
    port = 9464

    [engine]
    intra_op_threads = 2           # 0: all physical cores
    # provider = "tensorrt"      # needs onnxruntime-gpu (README "GPU providers (ONNX Runtime)")
    # trt_cache_dir = "/var/cache/unimp/trt"
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

try:  # Python 3.11+; JetPack 6 ships 3.10, where the tomli backport reads TOML
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[no-redef]

from runtime.limits import Limits

LogFormat = Literal["json", "text"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR"]


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending field (``section.key``)."""


def _help(text: str) -> dict[str, str]:
    """Field metadata carrying the field's documentation (shown by ``unimp serve --help``)."""
    return {"help": text}


def _default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "unimp-edge"


@dataclass
class AuthConfig:
    """Bearer-token authentication (``authorization: Bearer <token>`` metadata)."""

    tokens: dict[str, str] = field(
        default_factory=dict,
        metadata=_help(
            "client tokens as TENANT=TOKEN; a client token may call Personalization and read the catalog, "
            "and its tenant name partitions stored interactions and the prefix cache",
        ),
    )
    admin_token: str = field(
        default="",
        metadata=_help(
            "token that may also write the catalog (UpsertItem, DeleteItem); empty: nobody can write"
        ),
    )

    @property
    def enabled(self) -> bool:
        return bool(self.tokens) or bool(self.admin_token)


@dataclass
class TlsConfig:
    """Server TLS; mutual TLS when client_ca is set."""

    cert: Path | None = field(
        default=None, metadata=_help("PEM certificate chain of the server; enables TLS (with key)")
    )
    key: Path | None = field(default=None, metadata=_help("PEM private key of the server certificate"))
    client_ca: Path | None = field(
        default=None,
        metadata=_help(
            "PEM CA bundle that client certificates must chain to; enables mutual TLS (requires cert)"
        ),
    )

    @property
    def enabled(self) -> bool:
        return self.cert is not None


LimitsConfig = Limits
"""The ``[limits]`` section (``--limits-*`` flags): the runtime's one ``Limits`` definition."""


Provider = Literal["cpu", "cuda", "tensorrt"]


@dataclass
class EngineConfig:
    """How the model runs: execution provider, threads, continuous-batching width, context, KV pool, prefix cache."""

    provider: Provider = field(
        default="cpu",
        metadata=_help(
            "ONNX Runtime execution provider: cpu (the embedded default), cuda (CUDA EP) or tensorrt (TensorRT "
            "EP, CUDA EP for what TensorRT rejects); cuda and tensorrt need onnxruntime-gpu instead of "
            "onnxruntime, a CUDA device and, for tensorrt, the TensorRT libraries: anything missing is a startup "
            "error naming it, and a session onnxruntime moves off the requested provider is refused, never a "
            "silent CPU run"
        ),
    )
    device_id: int = field(default=0, metadata=_help("CUDA device of the cuda and tensorrt providers"))
    trt_cache_dir: Path | None = field(
        default=None,
        metadata=_help(
            "tensorrt provider: directory of the TensorRT engine and timing caches, one subdirectory per graph "
            "sha256 + GPU + compute capability + TensorRT version (empty: <artifacts>/.cache/trt); the first "
            "start on a GPU builds the engines (minutes), later starts load them"
        ),
    )
    trt_workspace_gb: float = field(
        default=0.0,
        metadata=_help("tensorrt provider: TensorRT builder workspace limit in GiB (0: TensorRT's default)"),
    )
    fp16: bool = field(
        default=False,
        metadata=_help(
            "tensorrt provider with TensorRT 10: let TensorRT choose fp16 kernels for fp32 graphs "
            "(trt_fp16_enable); TensorRT 11 removed that switch (export fp16 graphs instead), so it is an "
            "error there and with the cpu and cuda providers"
        ),
    )
    cuda_graph: bool = field(
        default=False,
        metadata=_help(
            "provider cuda, or tensorrt with native engines: capture each decode window's step (inplace KV "
            "layout) in a CUDA graph and replay it (untested on hardware); an error with onnxruntime's "
            "TensorRT EP, which keeps one graph per thread for every batch size"
        ),
    )
    intra_op_threads: int = field(
        default=0, metadata=_help("threads inside one operator; 0 lets ONNX Runtime choose (all physical cores)")
    )
    max_active: int = field(
        default=8, metadata=_help("sequences decoding at once (continuous batching width)")
    )
    max_queued: int = field(
        default=32,
        metadata=_help("requests waiting for a decode slot before new ones get RESOURCE_EXHAUSTED"),
    )
    max_context: int = field(
        default=0,
        metadata=_help("longest sequence (prompt + generated tokens) a request may reach; 0: the model's positions"),
    )
    kv_pool_bytes: int = field(
        default=0,
        metadata=_help(
            "bytes of the decoder KV pool (inplace layout), allocated once at startup, in rows of max_context "
            "positions (one row per beam); 0: max_active + limits.max_beams - 1 rows, fewer if that exceeds "
            "half the machine's memory, never fewer than limits.max_beams (untouched pages cost no memory)"
        ),
    )
    prefix_cache_bytes: int = field(
        default=256 << 20, metadata=_help("byte budget of the prompt-prefix KV cache (LRU; 0 disables it)")
    )


@dataclass
class MetricsConfig:
    """Prometheus metrics over HTTP on a separate port."""

    enabled: bool = field(default=True, metadata=_help("serve Prometheus metrics"))
    host: str = field(default="127.0.0.1", metadata=_help("address of the metrics HTTP endpoint"))
    port: int = field(default=9464, metadata=_help("port of the metrics HTTP endpoint (0: any free port)"))


@dataclass
class LogConfig:
    """Process logging."""

    level: LogLevel = field(default="INFO", metadata=_help("log level: DEBUG, INFO, WARNING or ERROR"))
    format: LogFormat = field(
        default="json", metadata=_help("json (one object per line, with request ids) or text")
    )


@dataclass
class ServerConfig:
    """Everything ``unimp serve`` needs."""

    artifacts: Path | None = field(
        default=None,
        metadata=_help("artifacts directory written by `unimp export` (required to serve a model)"),
    )
    host: str = field(
        default="127.0.0.1",
        metadata=_help("address to bind; anything but loopback needs TLS and a token unless insecure"),
    )
    port: int = field(default=50051, metadata=_help("gRPC port (0: any free port)"))
    state_dir: Path = field(
        default_factory=_default_state_dir,
        metadata=_help("directory of the SQLite store (interactions and catalog edits; survives restarts)"),
    )
    insecure: bool = field(
        default=False, metadata=_help("allow binding a non-loopback address without TLS or without tokens")
    )
    max_inflight: int = field(
        default=32,
        metadata=_help(
            "model requests (Recommend, Search, PredictPreference, Explain, SelectItems, GenerateImage) "
            "admitted at once; more get RESOURCE_EXHAUSTED immediately"
        ),
    )
    max_inflight_cheap: int = field(
        default=256,
        metadata=_help(
            "catalog and interaction-store requests (GetItem, ListItems, UpsertItem, DeleteItem, "
            "RecordInteraction, ...) in flight at once; they never take a model slot; more get "
            "RESOURCE_EXHAUSTED immediately"
        ),
    )
    max_inflight_cost: int = field(
        default=16384,
        metadata=_help(
            "budget of model work in flight, in decode row-steps: Explain holds num_beams x max_new_tokens, "
            "Recommend/Search in beam mode num_beams x max_new_tokens, GenerateImage its steps (256 code tokens "
            "with image_model VQGAN), other RPCs 1; "
            "a request that does not fit gets RESOURCE_EXHAUSTED, unless no other model request runs"
        ),
    )
    history_limit: int = field(
        default=50, metadata=_help("most recent stored interactions used when a request names a user_id")
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata=_help("seconds in-flight requests may finish after SIGTERM/SIGINT")
    )
    reflection: bool = field(
        default=True,
        metadata=_help("serve gRPC server reflection (needs a token like any RPC when auth is on)"),
    )
    auth: AuthConfig = field(default_factory=AuthConfig, metadata={"help": "authentication"})
    tls: TlsConfig = field(default_factory=TlsConfig, metadata={"help": "TLS"})
    limits: LimitsConfig = field(default_factory=LimitsConfig, metadata={"help": "request limits"})
    engine: EngineConfig = field(default_factory=EngineConfig, metadata={"help": "model execution"})
    metrics: MetricsConfig = field(default_factory=MetricsConfig, metadata={"help": "metrics"})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "logging"})

    def validate(self) -> ServerConfig:
        """Check ranges and combinations; raises ConfigError naming the field. Returns self."""
        _check_port("port", self.port)
        _check_port("metrics.port", self.metrics.port)
        if not self.host:
            raise ConfigError("host: must not be empty (use 0.0.0.0 for all IPv4 interfaces)")
        if self.max_inflight < 1:
            raise ConfigError(f"max_inflight: must be >= 1, got {self.max_inflight}")
        if self.max_inflight_cheap < 1:
            raise ConfigError(f"max_inflight_cheap: must be >= 1, got {self.max_inflight_cheap}")
        if self.max_inflight_cost < 1:
            raise ConfigError(f"max_inflight_cost: must be >= 1, got {self.max_inflight_cost}")
        if self.history_limit < 1:
            raise ConfigError(f"history_limit: must be >= 1, got {self.history_limit}")
        if not math.isfinite(self.shutdown_grace_s) or self.shutdown_grace_s < 0:
            raise ConfigError(f"shutdown_grace_s: must be a finite number >= 0, got {self.shutdown_grace_s}")
        e = self.engine
        for name, value, low in (("intra_op_threads", e.intra_op_threads, 0), ("max_active", e.max_active, 1),
                                 ("max_queued", e.max_queued, 0), ("prefix_cache_bytes", e.prefix_cache_bytes, 0),
                                 ("max_context", e.max_context, 0), ("kv_pool_bytes", e.kv_pool_bytes, 0),
                                 ("device_id", e.device_id, 0)):
            if value < low:
                raise ConfigError(f"engine.{name}: must be >= {low}, got {value}")
        if not math.isfinite(e.trt_workspace_gb) or e.trt_workspace_gb < 0:
            raise ConfigError(f"engine.trt_workspace_gb: must be a finite number >= 0, got {e.trt_workspace_gb}")
        if e.provider == "cpu":
            for name in ("fp16", "cuda_graph"):
                if getattr(e, name):
                    raise ConfigError(f"engine.{name}: needs engine.provider cuda or tensorrt (provider is cpu)")
        if e.fp16 and e.provider != "tensorrt":
            raise ConfigError(f"engine.fp16: applies to the tensorrt provider only (provider is {e.provider}); "
                              "export fp16 graphs to run fp16 on the CUDA EP")
        for f in dataclasses.fields(self.limits):
            value = getattr(self.limits, f.name)
            if value < 1:
                raise ConfigError(f"limits.{f.name}: must be >= 1, got {value}")
        if self.limits.max_image_side % 8:
            raise ConfigError(
                f"limits.max_image_side: must be a multiple of 8, got {self.limits.max_image_side}"
            )
        for tenant, token in self.auth.tokens.items():
            if not tenant or not token:
                raise ConfigError(f"auth.tokens: tenant and token must be non-empty (tenant {tenant!r})")
            if token == self.auth.admin_token:
                raise ConfigError(f"auth.tokens.{tenant}: must differ from auth.admin_token")
        if len(set(self.auth.tokens.values())) != len(self.auth.tokens):
            raise ConfigError("auth.tokens: two tenants share one token")
        if (self.tls.cert is None) != (self.tls.key is None):
            raise ConfigError("tls.cert / tls.key: give both or neither")
        if self.tls.client_ca is not None and self.tls.cert is None:
            raise ConfigError("tls.client_ca: mutual TLS needs tls.cert and tls.key")
        for name in ("cert", "key", "client_ca"):
            path = getattr(self.tls, name)
            if path is not None and not path.is_file():
                raise ConfigError(f"tls.{name}: {path} is not a readable file")
        return self


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{name}: must be 0..65535, got {port}")


# -- generic field handling (TOML + CLI) ------------------------------------------------------------


@dataclass(frozen=True)
class FieldInfo:
    """One leaf config field: its dotted name, type, default and help."""

    path: str
    """Dotted name, e.g. ``limits.max_image_bytes``."""
    type: Any
    default: Any
    help: str


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(ServerConfig)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(ServerConfig)
        if dataclasses.is_dataclass(hints[f.name])
    }


def iter_fields() -> list[FieldInfo]:
    """All leaf fields of ServerConfig in declaration order (sections flattened as ``section.key``)."""
    out: list[FieldInfo] = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        instance = cls()
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if dataclasses.is_dataclass(hint):
                walk(typing.cast(type, hint), f"{prefix}{f.name}.")
            else:
                out.append(
                    FieldInfo(
                        f"{prefix}{f.name}", hint, getattr(instance, f.name), f.metadata.get("help", "")
                    )
                )

    walk(ServerConfig, "")
    return out


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(underlying type, optional?) of a field annotation."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


def coerce(path: str, hint: Any, value: Any, base_dir: Path | None = None) -> Any:
    """Convert a TOML or CLI value to the field's type; raises ConfigError naming the field."""
    kind, optional = _base_type(hint)
    if value is None or (optional and value == ""):
        if optional:
            return None
        raise ConfigError(f"{path}: a value is required")
    origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        text = str(value).upper() if all(str(c).isupper() for c in choices) else str(value)
        if text not in choices:
            raise ConfigError(f"{path}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return text
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ConfigError(f"{path}: must be a table of strings")
        return dict(value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{path}: must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{path}: must be an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{path}: must be an integer, got {value!r}") from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{path}: must be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{path}: must be a number, got {value!r}") from None
    if kind is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{path}: must be a path string, got {value!r}")
        result = Path(value).expanduser()
        if base_dir is not None and not result.is_absolute():
            result = base_dir / result
        return result
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {kind!r}")  # pragma: no cover


def _apply(config: ServerConfig, path: str, value: Any) -> None:
    target: Any = config
    *sections, name = path.split(".")
    for section in sections:
        target = getattr(target, section)
    setattr(target, name, value)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> ServerConfig:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` keyed by dotted field name.

    The result is validated. Unknown keys, wrong types and bad ranges raise ConfigError naming the field.
    """
    config = ServerConfig()
    fields = {f.path: f for f in iter_fields()}
    sections = _section_types()
    if path is not None:
        file = Path(path).expanduser()
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"config: cannot read {file}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {file} is not valid TOML: {exc}") from exc
        base_dir = file.resolve().parent
        for key, value in data.items():
            if key in sections:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: must be a table ([{key}])")
                for sub, sub_value in value.items():
                    dotted = f"{key}.{sub}"
                    if dotted not in fields:
                        raise ConfigError(f"{dotted}: unknown setting")
                    _apply(config, dotted, coerce(dotted, fields[dotted].type, sub_value, base_dir))
            elif key in fields:
                _apply(config, key, coerce(key, fields[key].type, value, base_dir))
            else:
                raise ConfigError(f"{key}: unknown setting")
    for dotted, value in (overrides or {}).items():
        if dotted not in fields:
            raise ConfigError(f"{dotted}: unknown setting")
        _apply(config, dotted, coerce(dotted, fields[dotted].type, value))
    return config.validate()
