"""The ``unimp serve`` and ``unimp client`` subcommands (argparse), called by ``unimp.cli``.

``serve`` flags are generated from ``runtime.server.config``: every config field has a flag
(``limits.max_image_bytes`` -> ``--limits-max-image-bytes``, top-level fields without a prefix, the
token table as repeated ``--auth-token TENANT=TOKEN``), and its help text is the field's
documentation. Flags override the ``--config`` file, which overrides the defaults.

``client`` has one subcommand per RPC plus ``health``; results are printed to stdout as JSON
(images are written to files), errors go to stderr with the status code, and the exit status is
0 on success, 1 for an RPC error, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import typing
from pathlib import Path
from typing import Any, Literal

from runtime.server.config import ConfigError, iter_fields, load_config
from runtime.server.logs import configure_logging

logger = logging.getLogger(__name__)

_DEST_PREFIX = "cfg__"


# -- serve --------------------------------------------------------------------------------------------


_ALIASES = {"engine.provider": ("--provider",)}
"""Short spellings kept as part of the CLI contract (``unimp serve --provider cpu|cuda|tensorrt``)."""


def _flag(path: str) -> str:
    if path == "auth.tokens":
        return "--auth-token"
    return "--" + path.replace(".", "-").replace("_", "-")


def _flags(path: str) -> tuple[str, ...]:
    return (_flag(path), *_ALIASES.get(path, ()))


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``unimp serve`` flags: ``--config`` plus one flag per config field."""
    parser.description = (
        "Serve a UniMP model over gRPC (unimp.v1.Personalization, unimp.v1.Catalog, grpc.health.v1, reflection). "
        "Settings come from defaults, then --config FILE (TOML), then these flags. Prefer the config file for "
        "tokens: command-line arguments are visible to other local users."
    )
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="TOML config file using the 'config key' names below (a.b is key b of table [a])")
    scale = parser.add_argument_group(
        "scale-out (Ray Serve; needs the 'ray' extra: pip install 'unimp-edge[ray]')",
        "--engine ray serves the same RPCs through Ray Serve's gRPC ingress on --port, which binds ALL "
        "interfaces in plaintext (--host and tls.* do not apply): it needs --insecure, a firewall and TLS "
        "termination in front (README, deployment). Replicas share one interaction store in --state-dir.")
    scale.add_argument("--engine", choices=["local", "ray"], default="local",
                       help="local: this process serves (default); ray: a local Ray cluster with Serve replicas")
    scale.add_argument("--replicas", type=int, default=None, metavar="N",
                       help="with --engine ray: number of replicas, each opening the artifacts once (default: 1)")
    scale.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                       help="with --engine ray: let Serve autoscale between MIN and MAX replicas (replaces --replicas)")
    scale.add_argument("--replica-cpus", type=float, default=0.0, metavar="X",
                       help="with --engine ray: Ray CPUs each replica reserves (default: %(default)s, reserve none)")
    scale.add_argument("--router", choices=["affinity", "default"], default="affinity",
                       help="with --engine ray: affinity (a user's requests meet their cached history; default) or "
                            "Serve's default power-of-two-choices router")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for info in iter_fields():
        section = info.path.split(".")[0] if "." in info.path else ""
        if section not in groups:
            groups[section] = parser.add_argument_group(f"[{section}] settings" if section else "server settings")
        group = groups[section]
        dest = _DEST_PREFIX + info.path.replace(".", "__")
        default = "" if info.default in (None, {}, "") else f" (default: {info.default})"
        help_text = f"{info.help}{default}; config key {info.path}"
        kind = info.type
        args = typing.get_args(kind)
        if type(None) in args:
            kind = next(a for a in args if a is not type(None))
        if info.path == "auth.tokens":
            group.add_argument(_flag(info.path), dest=dest, action="append", metavar="TENANT=TOKEN",
                               default=argparse.SUPPRESS, help=help_text + " (repeatable)")
        elif kind is bool:
            group.add_argument(_flag(info.path), dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is Literal:
            group.add_argument(*_flags(info.path), dest=dest, choices=list(typing.get_args(kind)),
                               default=argparse.SUPPRESS, help=help_text)
        else:
            metavar = {int: "N", float: "X", Path: "PATH", str: "TEXT"}.get(kind, "VALUE")
            group.add_argument(_flag(info.path), dest=dest, metavar=metavar, default=argparse.SUPPRESS,
                               help=help_text)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config overrides given on the command line, keyed by dotted field name."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if not key.startswith(_DEST_PREFIX):
            continue
        path = key[len(_DEST_PREFIX):].replace("__", ".")
        if path == "auth.tokens":
            tokens = {}
            for pair in value:
                tenant, sep, token = pair.partition("=")
                if not sep or not tenant or not token:
                    raise ConfigError(f"auth.tokens: --auth-token expects TENANT=TOKEN, got {pair!r}")
                tokens[tenant] = token
            value = tokens
        out[path] = value
    return out


async def _serve(config: Any) -> int:
    from runtime.server.app import create_server

    server, _ = create_server(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread / platform without signals
            pass
    stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    waiting: set[asyncio.Future[Any]] = {stopper, server.loaded}
    done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if server.loaded in done and not server.loaded.result():
        logger.error("exiting: the engine failed to load")
        stopper.cancel()
        await server.stop(0)
        return 1
    await stopper
    logger.info("signal received: stopping with a grace period of %.1fs", config.shutdown_grace_s)
    await server.stop()
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """Run ``unimp serve`` until SIGTERM/SIGINT; returns the exit status (2 for a bad configuration)."""
    try:
        config = load_config(args.config, serve_overrides(args))
    except ConfigError as exc:
        configure_logging()
        logger.error("invalid configuration: %s", exc)
        return 2
    configure_logging(config.log.level, config.log.format)
    if config.artifacts is None:
        logger.error("invalid configuration: artifacts: required (--artifacts DIR, the output of `unimp export`)")
        return 2
    engine = getattr(args, "engine", "local")
    if engine == "local" and (getattr(args, "replicas", None) is not None or getattr(args, "autoscale", None)):
        logger.error("invalid configuration: replicas: --replicas and --autoscale need --engine ray")
        return 2
    if engine == "ray":
        return _run_ray(args, config)
    try:
        return asyncio.run(_serve(config))
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2


def _run_ray(args: argparse.Namespace, config: Any) -> int:
    """``unimp serve --engine ray``: a local Ray cluster with the Serve application (runtime.deploy)."""
    import importlib.util

    from runtime.deploy.app import ClusterOptions, check_exposure, parse_autoscale, run_cluster

    try:
        config.validate()
        options = ClusterOptions(
            replicas=args.replicas if args.replicas is not None else 1,
            autoscale=parse_autoscale(args.autoscale) if args.autoscale else None,
            replica_cpus=args.replica_cpus,
            affinity=args.router == "affinity",
        )
        options.validate()
        check_exposure(config)
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    if importlib.util.find_spec("ray") is None:
        logger.error("--engine ray needs Ray Serve: pip install 'unimp-edge[ray]' (ray[serve] 2.60)")
        return 2
    return run_cluster(config, options)


# -- client -------------------------------------------------------------------------------------------


def _common_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="127.0.0.1:50051", help="server address HOST:PORT (default: %(default)s)")
    parser.add_argument("--token", default=None, help="bearer token (client or admin)")
    parser.add_argument("--ca", type=Path, default=None, help="PEM CA to trust; enables TLS")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's trusted roots")
    parser.add_argument("--cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, default=None, help="PEM client private key (mutual TLS)")
    parser.add_argument("--server-name", default=None, help="expected TLS server name, if not the target host")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default: %(default)s)")


def _history_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--user", default="", help="user id whose stored interactions start the history")
    parser.add_argument("--item", action="append", default=[], metavar="ID", help="catalog id of a history item (repeatable)")
    parser.add_argument("--rating", action="append", default=[], type=int, metavar="N",
                        help="rating 1..5 of the n-th --item (repeatable, in --item order; preference tasks need them)")
    parser.add_argument("--image", action="append", default=[], type=Path, metavar="FILE",
                        help="image file of an inline history item (repeatable; after the --item ids)")


def _decode_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--top-k", type=int, default=10, help="items to return (default: %(default)s)")
    parser.add_argument("--mode", choices=["fast", "beam", "beam_constrained"], default="fast",
                        help="decoding: fast (item-slice top-k), beam (paper-parity; may return fewer items), "
                             "beam_constrained (beams spell only admissible items) (default: %(default)s)")
    parser.add_argument("--include-history", action="store_true", help="allow items already in the history")
    parser.add_argument("--allow", action="append", default=[], metavar="ID", help="only return these ids")
    parser.add_argument("--category", action="append", default=[], help="only return items of these categories")


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-item", required=True, metavar="ID", help="catalog id of the item to rate")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--max-new-tokens", type=int, default=0, help="explanation length limit (0: server default)")
    parser.add_argument("--seed", type=int, default=0)


def _item_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--item-id", required=True, help="catalog id")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``unimp client <rpc>`` subcommands."""
    parser.description = "Call a UniMP Edge server; prints JSON results."
    sub = parser.add_subparsers(dest="rpc", required=True, metavar="RPC")
    commands: dict[str, tuple[str, list[Any]]] = {
        "health": ("health of the server (exit status 0 only when SERVING)", []),
        "recommend": ("next-item recommendation", [_history_arguments, _decode_arguments]),
        "search": ("personalized search", [_history_arguments, _decode_arguments]),
        "predict-preference": ("rating distribution of one item", [_history_arguments, _sampling_arguments]),
        "explain": ("rating and streamed explanation", [_history_arguments, _sampling_arguments]),
        "select-items": ("choose among up to 5 candidates", [_history_arguments]),
        "generate-image": ("personalized image generation", [_history_arguments]),
        "record-interaction": ("append an interaction to a user's history", []),
        "delete-interaction": ("remove one interaction from a user's history", []),
        "forget-user": ("remove a user's whole stored history and its cached prefixes", []),
        "upsert-item": ("create or update a catalog item (admin token)", [_item_arguments]),
        "get-item": ("show a catalog item", [_item_arguments]),
        "list-items": ("list catalog items", []),
        "delete-item": ("delete a catalog item (admin token)", [_item_arguments]),
    }
    for name, (help_text, adders) in commands.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _common_client_arguments(p)
        for add in adders:
            add(p)
        if name == "health":
            p.add_argument("--service", default="", help="service name ('' is the whole server)")
        elif name == "search":
            p.add_argument("--query", required=True)
        elif name == "select-items":
            p.add_argument("--candidate", action="append", required=True, metavar="ID", help="candidate id (1..5)")
            p.add_argument("--max-selected", type=int, default=0)
        elif name == "generate-image":
            p.add_argument("--query", required=True)
            p.add_argument("--negative-prompt", default="")
            p.add_argument("--steps", type=int, default=0)
            p.add_argument("--width", type=int, default=0)
            p.add_argument("--height", type=int, default=0)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument("--image-model", choices=["unspecified", "vqgan", "diffusion"], default="unspecified",
                           help="image path: VQGAN codes (the paper's) or diffusion; unspecified: VQGAN when the "
                                "server has it")
            p.add_argument("--temperature", type=float, default=0.0, help="VQGAN: 0 greedy, else sample the codes")
            p.add_argument("--top-p", type=float, default=None, help="VQGAN: nucleus mass when sampling")
            p.add_argument("--out", type=Path, default=Path("generated.png"), help="PNG output file")
        elif name == "record-interaction":
            p.add_argument("--user", required=True)
            p.add_argument("--item", required=True, metavar="ID", help="catalog id")
            p.add_argument("--rating", type=int, default=0)
            p.add_argument("--explanation", default="")
        elif name == "delete-interaction":
            p.add_argument("--user", required=True)
            p.add_argument("--interaction-id", type=int, required=True, help="id printed by record-interaction")
        elif name == "forget-user":
            p.add_argument("--user", required=True)
        elif name == "upsert-item":
            for attr in ("category", "price", "brand", "title"):
                p.add_argument(f"--{attr}", default=None)
            p.add_argument("--image-file", type=Path, default=None, help="encoded image to store")
            p.add_argument("--available", action=argparse.BooleanOptionalAction, default=None)
        elif name == "get-item":
            p.add_argument("--image-out", type=Path, default=None, help="write the item's image here")
        elif name == "list-items":
            p.add_argument("--page-size", type=int, default=0)
            p.add_argument("--page-token", default="")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value) if f.name != "cancel"}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if hasattr(value, "value") and not isinstance(value, (int, float, str)):
        return value.value
    return value


def _emit(value: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(value), ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _history(args: argparse.Namespace) -> list[Any]:
    from runtime.types import HistoryItem

    if len(args.rating) > len(args.item):
        raise ValueError(f"{len(args.rating)} --rating values for {len(args.item)} --item ids")
    ratings = list(args.rating) + [0] * (len(args.item) - len(args.rating))
    items: list[Any] = [HistoryItem(item_id=i, rating=r) for i, r in zip(args.item, ratings)]
    items += [HistoryItem(image=Path(p).read_bytes()) for p in args.image]
    return items


def run_client(args: argparse.Namespace) -> int:
    """Run one ``unimp client`` call; returns the exit status."""
    from runtime.api import ImageResult
    from runtime.client import ClientTls, RpcError, UnimpClient
    from runtime.types import DecodeMode, ItemFilter, ItemMeta, SamplingOptions

    tls: ClientTls | bool | None = None
    if args.ca or args.cert or args.key:
        tls = ClientTls.from_files(args.ca, args.cert, args.key, args.server_name)
    elif args.tls:
        tls = ClientTls(server_name=args.server_name)
    rpc = args.rpc
    try:
        with UnimpClient(args.target, token=args.token, tls=tls, timeout=args.timeout) as client:
            if rpc == "health":
                status = client.health(args.service)
                _emit({"status": status})
                return 0 if status == "SERVING" else 1
            if rpc in ("recommend", "search"):
                item_filter = ItemFilter(exclude_history=not args.include_history, allow=tuple(args.allow),
                                         categories=tuple(args.category))
                mode = DecodeMode(args.mode)
                if rpc == "recommend":
                    _emit(client.recommend(_history(args), user_id=args.user, top_k=args.top_k, mode=mode,
                                           filter=item_filter))
                else:
                    _emit(client.search(args.query, _history(args), user_id=args.user, top_k=args.top_k, mode=mode,
                                        filter=item_filter))
            elif rpc in ("predict-preference", "explain"):
                sampling = SamplingOptions(temperature=args.temperature, seed=args.seed,
                                           max_new_tokens=args.max_new_tokens)
                if rpc == "predict-preference":
                    _emit(client.predict_preference(args.target_item, _history(args), user_id=args.user,
                                                    sampling=sampling))
                else:
                    for event in client.explain(args.target_item, _history(args), user_id=args.user,
                                                sampling=sampling):
                        _emit(event)
            elif rpc == "select-items":
                _emit(client.select_items(args.candidate, _history(args), user_id=args.user,
                                          max_selected=args.max_selected))
            elif rpc == "generate-image":
                for image_event in client.generate_image(args.query, _history(args), user_id=args.user,
                                                         negative_prompt=args.negative_prompt, steps=args.steps,
                                                         width=args.width, height=args.height, seed=args.seed,
                                                         image_model=args.image_model,
                                                         temperature=args.temperature, top_p=args.top_p):
                    if isinstance(image_event, ImageResult):
                        args.out.write_bytes(image_event.png)
                        _emit({"image": str(args.out), "prompt": image_event.prompt,
                               "width": image_event.width, "height": image_event.height,
                               "stage_seconds": image_event.timings})
                    else:
                        _emit(image_event)
            elif rpc == "record-interaction":
                from runtime.types import HistoryItem

                item = HistoryItem(item_id=args.item, rating=args.rating, explanation=args.explanation)
                _emit(client.record_interaction(args.user, item))
            elif rpc == "delete-interaction":
                _emit({"history_length": client.delete_interaction(args.user, args.interaction_id)})
            elif rpc == "forget-user":
                _emit(client.forget_user(args.user))
            elif rpc == "upsert-item":
                attrs = {a: getattr(args, a) for a in ("category", "price", "brand", "title")}
                meta = ItemMeta(**{k: v or "" for k, v in attrs.items()}) if any(
                    v is not None for v in attrs.values()) else None
                image = args.image_file.read_bytes() if args.image_file else None
                _emit(client.upsert_item(args.item_id, meta, image, args.available))
            elif rpc == "get-item":
                fetched = client.get_item(args.item_id, include_image=args.image_out is not None)
                if args.image_out is not None and fetched.image:
                    args.image_out.write_bytes(fetched.image)
                _emit(fetched.item)
            elif rpc == "list-items":
                _emit(client.list_items(args.page_size, args.page_token))
            elif rpc == "delete-item":
                client.delete_item(args.item_id)
                _emit({"deleted": args.item_id})
            else:  # pragma: no cover - argparse restricts choices
                raise ValueError(f"unknown rpc {rpc}")
    except RpcError as exc:
        field = f" (field {exc.field})" if exc.field else ""
        sys.stderr.write(f"{rpc}: {exc.code.name}: {exc.details}{field}\n")
        return 1
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"{rpc}: {exc}\n")
        return 2
    return 0
