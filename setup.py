"""Build hook: generate the gRPC modules (runtime/server/gen, not versioned) before the package list is
made, so a wheel or a plain ``pip install .`` carries them and serves without protoc or the .proto sources.
Editable installs regenerate on import instead (runtime.server.protos)."""

import sys
from pathlib import Path

from setuptools import setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
import runtime.server.protos  # noqa: F401  (runs protoc when gen/ is missing or stale)

setup()
