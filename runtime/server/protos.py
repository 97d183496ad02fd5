"""Generated protobuf / gRPC modules of ``protos/unimp/v1``, (re)generated on import when needed.

``runtime/server/gen/`` is not versioned: importing this module runs ``grpc_tools.protoc`` when the
generated files are missing or were generated from different ``.proto`` contents (a content hash is
kept in ``gen/.stamp``), so a fresh clone works without a build step. Generation writes into a
temporary directory under a file lock and renames it into place, so concurrent processes never see a
half-written package. protoc emits ``from unimp.v1 import ...``; those imports are rewritten to
``runtime.server.gen.unimp.v1`` so the descriptors keep their canonical file names
(``unimp/v1/*.proto``, which reflection clients see) without putting ``gen/`` on ``sys.path``.

This is the only module that imports the generated code; the rest of ``runtime.server`` imports the
message modules from here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE_DIR = Path(__file__).resolve().parent
GEN_DIR = PACKAGE_DIR / "gen"
PROTO_ROOT = PACKAGE_DIR.parents[1] / "protos"
PROTO_FILES = ("unimp/v1/catalog.proto", "unimp/v1/personalization.proto")
GEN_PACKAGE = "runtime.server.gen"
_STAMP = ".stamp"
_IMPORT_RE = re.compile(r"^(\s*)from unimp\.v1 import ", re.MULTILINE)


class ProtoGenerationError(Exception):
    """protoc failed, or neither the generated modules nor the .proto sources are present."""


def _source_hash() -> str:
    digest = hashlib.sha256()
    for rel in PROTO_FILES:
        digest.update(rel.encode())
        digest.update((PROTO_ROOT / rel).read_bytes())
    return digest.hexdigest()


def _expected_outputs(root: Path) -> list[Path]:
    outputs = []
    for rel in PROTO_FILES:
        stem = root / rel[: -len(".proto")]
        outputs += [stem.with_name(stem.name + "_pb2.py"), stem.with_name(stem.name + "_pb2_grpc.py")]
    return outputs


def is_stale() -> bool:
    """True when the generated modules are missing or do not match the current .proto files."""
    missing = any(not path.is_file() for path in _expected_outputs(GEN_DIR))
    if not PROTO_ROOT.is_dir():
        if missing:
            raise ProtoGenerationError(
                f"neither generated modules in {GEN_DIR} nor .proto sources in {PROTO_ROOT} exist"
            )
        return False  # installed without sources: use what was generated at build time
    if missing:
        return True
    stamp = GEN_DIR / _STAMP
    return not stamp.is_file() or stamp.read_text().strip() != _source_hash()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    key = hashlib.sha256(str(GEN_DIR).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"unimp-protos-{key}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def generate(force: bool = False) -> bool:
    """Run protoc into ``gen/`` if stale (or ``force``); returns whether it generated anything."""
    if not force and not is_stale():
        return False
    with _locked():
        if not force and not is_stale():  # another process generated while we waited
            return False
        try:
            from grpc_tools import protoc
        except ImportError as exc:
            raise ProtoGenerationError(
                "the generated gRPC modules are missing or stale and grpcio-tools is not installed: "
                "pip install grpcio-tools (or install the package's dev extra)"
            ) from exc
        well_known = Path(protoc.__file__).resolve().parent / "_proto"
        tmp = Path(tempfile.mkdtemp(prefix=".gen-", dir=PACKAGE_DIR))
        tmp.chmod(0o755)
        try:
            args = [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={tmp}",
                f"--pyi_out={tmp}",
                f"--grpc_python_out={tmp}",
                *[str(PROTO_ROOT / rel) for rel in PROTO_FILES],
            ]
            code = protoc.main(args)
            if code != 0:
                raise ProtoGenerationError(f"protoc exited with {code} for {', '.join(PROTO_FILES)}")
            for path in list(tmp.rglob("*.py")) + list(tmp.rglob("*.pyi")):
                text = path.read_text(encoding="utf-8")
                path.write_text(_IMPORT_RE.sub(rf"\1from {GEN_PACKAGE}.unimp.v1 import ", text), encoding="utf-8")
            for directory in [tmp, *[p for p in tmp.rglob("*") if p.is_dir()]]:
                (directory / "__init__.py").touch()
            (tmp / _STAMP).write_text(_source_hash() + "\n")
            old = PACKAGE_DIR / f".gen-old-{tmp.name}"
            if GEN_DIR.exists():
                GEN_DIR.rename(old)
            tmp.rename(GEN_DIR)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("generated gRPC modules from %s into %s", PROTO_ROOT, GEN_DIR)
        return True


generate()

from runtime.server.gen.unimp.v1 import (  # noqa: E402
    catalog_pb2,
    catalog_pb2_grpc,
    personalization_pb2,
    personalization_pb2_grpc,
)

__all__ = [
    "ProtoGenerationError",
    "catalog_pb2",
    "catalog_pb2_grpc",
    "generate",
    "is_stale",
    "personalization_pb2",
    "personalization_pb2_grpc",
]
