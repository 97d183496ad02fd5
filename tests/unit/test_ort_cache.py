"""The optimised-graph cache of the CPU sessions (``.ort-cache/``): keyed by what the graph is, published
atomically, so that a replaced graph or a hard-linked copy of an artifacts directory never runs another
graph's optimised form."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.backends import BackendConfig
from runtime.backends.ort import OrtSession, optimized_cache_path
from runtime.manifest import GraphEntry, sha256_file

X = np.arange(4, dtype=np.float32).reshape(1, 4)


def _graph(path: Path, scale: float) -> np.ndarray:
    """y = x @ W with W = scale * I(4) (and an Identity for the optimiser to remove); returns x @ W."""
    weight = (scale * np.eye(4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x1"]), helper.make_node("MatMul", ["x1", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return X @ weight


def _run(path: Path, graph: GraphEntry | None = None) -> np.ndarray:
    session = OrtSession(path, BackendConfig(intra_op_threads=1), graph)
    return session.run({"x": X})["y"]


def test_a_hard_linked_copy_with_another_graph_runs_its_own_graph(tmp_path: Path) -> None:
    a = tmp_path / "a" / "decoder.onnx"
    expected_a = _graph(a, 2.0)
    np.testing.assert_array_equal(_run(a), expected_a)  # writes a/.ort-cache/
    (cached_a,) = (tmp_path / "a" / ".ort-cache").iterdir()
    optimised_a = cached_a.read_bytes()
    # `cp -al a b`: b's files, its optimised cache included, are the same inodes as a's
    shutil.copytree(tmp_path / "a", tmp_path / "b", copy_function=os.link)
    b = tmp_path / "b" / "decoder.onnx"
    expected_b = _graph(b.with_name("new.onnx"), 3.0)
    os.replace(b.with_name("new.onnx"), b)
    past = cached_a.stat().st_mtime - 3600  # older than every cache file: an mtime check would take a's
    os.utime(b, (past, past))
    np.testing.assert_array_equal(_run(b), expected_b)
    np.testing.assert_array_equal(_run(a), expected_a)  # a's cache file was not written through the link
    assert cached_a.read_bytes() == optimised_a
    # b holds its own entry, published under a new inode; a's entry, stale for b, was unlinked there
    (cached_b,) = (tmp_path / "b" / ".ort-cache").iterdir()
    assert cached_b.name != cached_a.name and cached_b.stat().st_ino != cached_a.stat().st_ino
    assert cached_a.stat().st_nlink == 1


def test_a_graph_entry_keys_the_cache_by_its_sha256_and_old_versions_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "decoder.onnx"
    cache = tmp_path / ".ort-cache"
    expected = _graph(path, 2.0)
    entry = GraphEntry(file=path.name, inputs=[], outputs=[], sha256=sha256_file(path))
    cache.mkdir()
    legacy = cache / "decoder.cpu.all.onnx"  # the unkeyed name of earlier releases
    legacy.write_bytes(b"stale")
    other = cache / "decoder.prefill.0123456789abcdef.cpu.all.onnx"  # another graph's entry: kept
    other.write_bytes(b"other")
    np.testing.assert_array_equal(_run(path, entry), expected)
    first = optimized_cache_path(path, BackendConfig(), entry)
    assert first.name == f"decoder.{entry.sha256[:16]}.cpu.all.onnx" and first.is_file()
    assert not legacy.exists() and other.is_file()
    # a reopen takes the cached graph and writes nothing
    stamp = first.stat().st_mtime_ns
    np.testing.assert_array_equal(_run(path, entry), expected)
    assert first.stat().st_mtime_ns == stamp and sorted(cache.iterdir()) == sorted([first, other])
    # a new graph under the same name: its own entry, the earlier version's dropped
    expected = _graph(path, 5.0)
    entry = GraphEntry(file=path.name, inputs=[], outputs=[], sha256=sha256_file(path))
    np.testing.assert_array_equal(_run(path, entry), expected)
    second = optimized_cache_path(path, BackendConfig(), entry)
    assert second != first and second.is_file() and not first.exists()


def test_without_an_entry_the_key_follows_the_file(tmp_path: Path) -> None:
    path = tmp_path / "g.onnx"
    _graph(path, 1.0)
    key = optimized_cache_path(path, BackendConfig(), None)
    assert optimized_cache_path(path, BackendConfig(), None) == key
    _graph(path, 4.0)  # rewritten in place: new mtime (and size or inode may stay)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))
    assert optimized_cache_path(path, BackendConfig(), None) != key
    shared = BackendConfig(optimized_cache_dir=tmp_path / "shared")
    assert optimized_cache_path(path, shared, None).parent == tmp_path / "shared"
