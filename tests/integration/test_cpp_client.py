"""The C++ point-of-sale client, built with CMake against the system gRPC, talking to the Python server.

Without the C++ toolchain (cmake, a compiler, protoc, grpc_cpp_plugin, gRPC C++ headers) the tests
skip locally and FAIL when the environment variable CI is set, so CI cannot silently lose them.
The build goes to a temporary directory; set UNIMP_CPP_BUILD_DIR to reuse one across runs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.client import UnimpClient
from runtime.server.app import ServerThread
from runtime.server.config import ServerConfig
from tests.integration.fake_engine import FakeEngine

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("cmake", "protoc", "grpc_cpp_plugin")
APT_HINT = "apt-get install -y cmake g++ libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev"
# CMake messages meaning "a dependency is not installed" (as opposed to a broken CMakeLists.txt).
MISSING_DEPENDENCY = ("Could NOT find Protobuf", "Could NOT find PkgConfig", "No package 'grpc++' found",
                      "None of the required 'grpc++'", "Could not find grpc_cpp_plugin", "UNIMP_GRPC_CPP_PLUGIN-NOTFOUND",
                      "No CMAKE_CXX_COMPILER could be found")
TOKEN = "pos-token"


def _unavailable(reason: str) -> None:
    message = f"C++ client toolchain unavailable: {reason}. Install it with: {APT_HINT}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so this is a failure rather than a skip)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def pos_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not any(shutil.which(cxx) for cxx in ("c++", "g++", "clang++")):
        missing.append("a C++ compiler")
    if missing:
        _unavailable("missing " + ", ".join(missing))
    build = Path(os.environ.get("UNIMP_CPP_BUILD_DIR") or tmp_path_factory.mktemp("cpp-build"))
    # -O0 without debug info: the generated protobuf code compiles several times faster.
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), "-DCMAKE_BUILD_TYPE=Debug", "-DCMAKE_CXX_FLAGS_DEBUG=-O0"],
        capture_output=True, text=True, timeout=300,
    )
    output = configure.stdout + configure.stderr
    if configure.returncode != 0:
        if any(marker in output for marker in MISSING_DEPENDENCY):
            _unavailable("CMake could not find gRPC C++ / protobuf:\n" + output[-2000:])
        pytest.fail(f"cmake configure failed:\n{output[-4000:]}", pytrace=False)
    built = subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)],
                           capture_output=True, text=True, timeout=900)
    if built.returncode != 0:
        pytest.fail(f"C++ build failed:\n{(built.stdout + built.stderr)[-4000:]}", pytrace=False)
    binary = build / "pos_client"
    assert binary.is_file(), f"{binary} was not built"
    return binary


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    config = ServerConfig(port=0, state_dir=tmp_path_factory.mktemp("cpp-state"))
    config.metrics.enabled = False
    config.log.level = "WARNING"
    config.auth.tokens = {"store-7": TOKEN}
    with ServerThread(config, FakeEngine()) as thread:
        yield thread


def run(binary: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=30)


def test_health(pos_client: Path, server: ServerThread) -> None:
    result = run(pos_client, "health", "--target", server.target)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SERVING"


def test_recommend_matches_python_client(pos_client: Path, server: ServerThread) -> None:
    result = run(pos_client, "recommend", "--target", server.target, "--token", TOKEN,
                 "--item", "sku-0001", "sku-0002", "--item", "sku-0003", "--top-k", "5")
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    with UnimpClient(server.target, token=TOKEN) as client:
        expected = client.recommend(["sku-0001", "sku-0002", "sku-0003"], top_k=5).items
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r[1] for r in rows] == [i.item_id for i in expected]
    assert [float(r[2]) for r in rows] == pytest.approx([i.score for i in expected], rel=1e-5)
    assert [r[3] for r in rows] == [i.meta.title if i.meta else "" for i in expected]


def test_recommend_for_a_stored_user(pos_client: Path, server: ServerThread) -> None:
    with UnimpClient(server.target, token=TOKEN) as client:
        client.record_interaction("loyalty-123", "sku-0008")
    result = run(pos_client, "recommend", "--target", server.target, "--token", TOKEN, "--user", "loyalty-123",
                 "--top-k", "3")
    assert result.returncode == 0, result.stderr
    ids = [line.split("\t")[1] for line in result.stdout.splitlines()]
    assert len(ids) == 3 and "sku-0008" not in ids


def test_recommend_modes(pos_client: Path, server: ServerThread) -> None:
    for mode in ("fast", "beam", "beam-constrained"):
        result = run(pos_client, "recommend", "--target", server.target, "--token", TOKEN, "--item", "sku-0001",
                     "--top-k", "3", "--mode", mode)
        assert result.returncode == 0, (mode, result.stderr)
        assert len(result.stdout.splitlines()) == 3
    bad = run(pos_client, "recommend", "--target", server.target, "--item", "sku-0001", "--mode", "greedy")
    assert bad.returncode == 2 and "--mode must be" in bad.stderr


def test_delete_interaction_and_forget_user(pos_client: Path, server: ServerThread) -> None:
    with UnimpClient(server.target, token=TOKEN) as client:
        first = client.record_interaction("loyalty-77", "sku-0004")
        client.record_interaction("loyalty-77", "sku-0005")
    deleted = run(pos_client, "delete-interaction", "--target", server.target, "--token", TOKEN,
                  "--user", "loyalty-77", "--interaction-id", str(first.interaction_id))
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.splitlines() == ["history_length\t1"]
    again = run(pos_client, "delete-interaction", "--target", server.target, "--token", TOKEN,
                "--user", "loyalty-77", "--interaction-id", str(first.interaction_id))
    assert again.returncode == 1 and "NOT_FOUND" in again.stderr and "(field interaction_id)" in again.stderr
    forgot = run(pos_client, "forget-user", "--target", server.target, "--token", TOKEN, "--user", "loyalty-77")
    assert forgot.returncode == 0, forgot.stderr
    assert forgot.stdout.splitlines()[0] == "interactions_removed\t1"
    with UnimpClient(server.target, token=TOKEN) as client:
        assert client.forget_user("loyalty-77").interactions_removed == 0  # nothing left to forget
    usage = run(pos_client, "forget-user", "--target", server.target)
    assert usage.returncode == 2 and "needs --user" in usage.stderr


def test_errors_carry_status_and_field(pos_client: Path, server: ServerThread) -> None:
    no_token = run(pos_client, "recommend", "--target", server.target, "--item", "sku-0001")
    assert no_token.returncode == 1 and "UNAUTHENTICATED" in no_token.stderr
    unknown = run(pos_client, "recommend", "--target", server.target, "--token", TOKEN, "--item", "nope")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr and "(field history[0].item_id)" in unknown.stderr
    empty = run(pos_client, "recommend", "--target", server.target, "--token", TOKEN)
    assert empty.returncode == 1 and "INVALID_ARGUMENT" in empty.stderr and "(field history)" in empty.stderr
    usage = run(pos_client, "recommend", "--bogus")
    assert usage.returncode == 2 and "unknown option" in usage.stderr


def test_mutual_tls(pos_client: Path, tmp_path: Path) -> None:
    from tests.integration.test_server import _certificates

    pem = _certificates(tmp_path)
    config = ServerConfig(port=0, state_dir=tmp_path / "state")
    config.metrics.enabled = False
    config.log.level = "WARNING"
    config.tls.cert, config.tls.key, config.tls.client_ca = pem["server.crt"], pem["server.key"], pem["ca.crt"]
    with ServerThread(config, FakeEngine()) as server:
        tls = ("--ca", str(pem["ca.crt"]), "--server-name", "localhost")
        ok = run(pos_client, "recommend", "--target", server.target, *tls, "--cert", str(pem["client.crt"]),
                 "--key", str(pem["client.key"]), "--item", "sku-0001", "--top-k", "2")
        assert ok.returncode == 0, ok.stderr
        assert len(ok.stdout.splitlines()) == 2
        no_cert = run(pos_client, "health", "--target", server.target, *tls, "--timeout-ms", "2000")
        assert no_cert.returncode == 1 and "UNAVAILABLE" in no_cert.stderr


@pytest.fixture(scope="module")
def vqgan_server(tiny_artifacts_with_vqgan: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """The real engine on the tiny demo with VQGAN graphs (no diffusion graphs)."""
    from runtime.engine import Runtime, RuntimeConfig

    cache = tmp_path_factory.mktemp("cpp-vq-cache") / "latents"
    engine = Runtime.open(tiny_artifacts_with_vqgan, RuntimeConfig(progress=False, latent_cache_dir=cache))
    config = ServerConfig(port=0, state_dir=tmp_path_factory.mktemp("cpp-vq-state"))
    config.metrics.enabled = False
    config.log.level = "WARNING"
    try:
        with ServerThread(config, engine) as thread:
            yield thread
    finally:
        engine.close()


def test_generate_image_writes_the_png(pos_client: Path, vqgan_server: ServerThread, tmp_path: Path) -> None:
    from PIL import Image

    out = tmp_path / "generated.png"
    result = run(pos_client, "generate-image", "--target", vqgan_server.target, "--item", "P00003", "P00011",
                 "--query", "red sneaker", "--image-model", "vqgan", "--out", str(out), "--timeout-ms", "120000")
    assert result.returncode == 0, result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("progress ")] == [
        f"progress {k}/16" for k in range(1, 17)]
    assert result.stdout.splitlines()[0] == f"png\t{out}\t256x256"
    assert Image.open(out).size == (256, 256)
    missing = run(pos_client, "generate-image", "--target", vqgan_server.target, "--item", "P00003",
                  "--query", "red sneaker", "--image-model", "diffusion", "--out", str(tmp_path / "no.png"))
    assert missing.returncode == 1 and "UNAVAILABLE" in missing.stderr and "(field image_model)" in missing.stderr
    assert not (tmp_path / "no.png").exists()
    usage = run(pos_client, "generate-image", "--target", vqgan_server.target, "--query", "x")
    assert usage.returncode == 2 and "needs --query TEXT and --out" in usage.stderr
