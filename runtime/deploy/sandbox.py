"""Running Ray on loopback only: a private network namespace, and a private HOME / temp directory.

Serve's gRPC proxy (and each replica's internal gRPC server) binds every interface, so tests and the
cluster benchmark run Ray inside a new network namespace whose only interface is loopback
(``unshare -n`` + ``ip link set lo up``; needs root or user namespaces). Ray 2.60 also writes
``~/.ray/auth_token`` and ``/tmp/ray``: ``private_env`` points HOME, TMPDIR and Ray's temp dir into a
directory of the caller's.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class SandboxError(Exception):
    """No way to start a private network namespace here."""


def netns_command(argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run in a fresh network namespace with only loopback up."""
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        raise SandboxError("a private network namespace needs `unshare` (util-linux) and `ip` (iproute2)")
    inner = f"{shlex.quote(ip)} link set lo up && exec {shlex.join(argv)}"
    prefix = [unshare, "-n"] if os.geteuid() == 0 else [unshare, "-r", "-n"]
    return [*prefix, "sh", "-c", inner]


def private_env(workdir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment whose HOME and TMPDIR lie in ``workdir`` (Ray's token file and temp files)."""
    env = dict(os.environ if base is None else base)
    home, tmp = workdir / "home", workdir / "tmp"
    home.mkdir(parents=True, exist_ok=True)
    tmp.mkdir(parents=True, exist_ok=True)
    env.update({"HOME": str(home), "TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"})
    return env


def ray_temp_dir(workdir: Path) -> Path:
    """Ray's ``_temp_dir`` in ``workdir`` (kept short: Ray's socket paths must fit in 107 bytes)."""
    path = workdir / "r"
    path.mkdir(parents=True, exist_ok=True)
    return path


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (other than this process)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            out.append(int(entry.name))
    return out


def free_port() -> int:
    """A TCP port free on loopback now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(channel: Any, timeout: float) -> str:
    """grpc.health.v1 Check through the ingress until SERVING (Serve's proxy learns routes asynchronously);
    returns the last status seen."""
    import time

    import grpc
    from grpc_health.v1 import health_pb2

    deadline, status = time.monotonic() + timeout, "UNKNOWN"
    while time.monotonic() < deadline:
        try:
            raw = channel.unary_unary("/grpc.health.v1.Health/Check")(
                health_pb2.HealthCheckRequest().SerializeToString(), timeout=10)
            status = health_pb2.HealthCheckResponse.ServingStatus.Name(health_pb2.HealthCheckResponse.FromString(
                raw).status)
            if status == "SERVING":
                break
        except grpc.RpcError as exc:
            status = exc.code().name
        time.sleep(0.2)
    return status
