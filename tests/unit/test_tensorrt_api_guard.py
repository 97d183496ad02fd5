"""TensorRT APIs that TensorRT 11 (weak-typing precision flags) or TensorRT 10 (binding indices, implicit
batch) removed never appear in the code, and the type stubs stay out of every install."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = re.compile(
    r"BuilderFlag\.(FP16|INT8|BF16|FP8|INT4|FP4)\b"  # weak typing: gone in TensorRT 11 (strong typing + Q/DQ)
    r"|\bexecute_async_v2\b|\bexecute_v2\b"  # pointer-list execution; execute_async_v3 with tensor addresses
    r"|\bget_binding_\w+|\bbinding_is_input\b|\bset_binding_shape\b|\bnum_bindings\b"  # binding indices
    r"|\bbuild_engine\(|\bmax_workspace_size\b|\bmax_batch_size\b"  # implicit batch / TensorRT 8 builder
)
SCANNED = ("runtime", "export", "unimp", "benchmarks", "typings", "tests/fakes")


def forbidden_uses(text: str) -> list[str]:
    return [m.group(0) for m in FORBIDDEN.finditer(text)]


def test_the_guard_catches_each_pattern() -> None:
    samples = ["cfg.set_flag(trt.BuilderFlag.FP16)", "trt.BuilderFlag.INT8", "BuilderFlag.BF16", "BuilderFlag.FP8",
               "BuilderFlag.INT4", "ctx.execute_async_v2(bindings, s)", "engine.get_binding_shape(0)",
               "builder.build_engine(net, cfg)", "config.max_workspace_size = 1"]
    for sample in samples:
        assert forbidden_uses(sample), sample
    assert forbidden_uses("build_engines(root, cfg); ctx.execute_async_v3(s); BuilderFlag.REFIT") == []


def test_no_forbidden_tensorrt_api_in_the_code() -> None:
    hits = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py*")):
            if path.suffix not in (".py", ".pyi") or "gen" in path.relative_to(ROOT).parts:
                continue
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                hits += [f"{path.relative_to(ROOT)}:{lineno}: {use}" for use in forbidden_uses(line)]
    assert hits == []


def test_type_stubs_are_for_mypy_only() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["tool"]["mypy"]["mypy_path"] == "typings"
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    assert not any(re.fullmatch(p.replace("*", ".*"), "typings") for p in include)
    stubs = ROOT / "typings"
    assert (stubs / "tensorrt" / "__init__.pyi").is_file() and (stubs / "cuda" / "bindings" / "runtime.pyi").is_file()
    assert not list(stubs.rglob("*.py"))
    # typings/ is never on sys.path: its bare tensorrt/ directory would import as an empty namespace package
    import importlib.util

    for name in ("tensorrt", "cuda"):
        spec = importlib.util.find_spec(name)
        places = [] if spec is None else [spec.origin or "", *(spec.submodule_search_locations or [])]
        assert not any(str(stubs) in str(p) for p in places), (name, places)
