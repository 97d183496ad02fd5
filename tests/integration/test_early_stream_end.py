"""Streams that end early, against a real `unimp serve` subprocess on the tiny demo (with diffusion).

Every way a streaming call can end before its last message: the client cancels it, its deadline
passes (1 / 50 / 500 ms), the client process is killed, the server is stopped with a grace period
shorter than the streams. After each phase the server must still run (no SIGSEGV from touching a call
that grpc already tore down), answer health SERVING, and have released every request slot, its decode
budget and the KV cache. The server runs with ``-X faulthandler`` and its stderr goes to a file that is
printed when a test fails.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from runtime.server.protos import personalization_pb2 as ppb
from runtime.server.protos import personalization_pb2_grpc as ppb_grpc

HISTORY = [ppb.HistoryItem(item_id=i, rating=4) for i in ("P00003", "P00017")]
TARGET = ppb.HistoryItem(item_id="P00021")


def explain_request(max_new_tokens: int = 512, num_beams: int = 1) -> ppb.ExplainRequest:
    """Sampled text streams a piece per token (~0.5 s for 512 tokens); beams emit the text at the end."""
    sampling = ppb.SamplingOptions(max_new_tokens=max_new_tokens, temperature=1.0, seed=7, num_beams=num_beams)
    return ppb.ExplainRequest(history=HISTORY, target=TARGET, sampling=sampling)


def image_request(steps: int = 150, side: int = 128) -> ppb.GenerateImageRequest:
    """150 steps at 128x128 run for seconds on the tiny UNet; a progress message follows each step."""
    return ppb.GenerateImageRequest(history=HISTORY, query="red sneaker", steps=steps, width=side, height=side)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """`python -X faulthandler -m unimp serve` on free gRPC and metrics ports."""

    def __init__(self, artifacts: Path, workdir: Path, grace_s: float = 10.0) -> None:
        self.port, self.metrics_port = _free_port(), _free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        self.stderr_path = workdir / "server.stderr"
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "faulthandler", "-m", "unimp", "serve", "--artifacts", str(artifacts),
             "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--state-dir",
             str(workdir / "state"), "--shutdown-grace-s", str(grace_s), "--log-level", "WARNING",
             "--log-format", "text"],
            stdout=subprocess.DEVNULL, stderr=self._stderr,
        )
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = ppb_grpc.PersonalizationStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + 60
        while self.health() != "SERVING":
            assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}\n{self.stderr()}"
            assert time.monotonic() < deadline, f"the server did not become SERVING\n{self.stderr()}"
            time.sleep(0.1)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def health(self) -> str:
        try:
            status = self._health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
        except grpc.RpcError as exc:
            return f"error {exc.code()}"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples and labelled ones as name{k="v",...} (labels sorted)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def assert_healthy_and_drained(self, timeout: float = 20.0) -> dict[str, float]:
        """Alive, SERVING, and (within timeout) nothing in flight: slots, decode budget, KV bytes, queue."""
        assert self.proc.poll() is None, f"the server died with {self.proc.returncode}\n{self.stderr()}"
        assert self.health() == "SERVING", self.stderr()
        gauges = ("unimp_inflight_requests", "unimp_inflight_cheap_requests", "unimp_inflight_cost",
                  "unimp_kv_cache_bytes", "unimp_engine_queue_depth")
        end = time.monotonic() + timeout
        while True:
            values = self.metrics()
            held = {g: values.get(g) for g in gauges if values.get(g) != 0.0}
            if not held:
                break
            assert time.monotonic() < end, f"still held after {timeout}s: {held}\n{self.stderr()}"
            time.sleep(0.05)
        assert self.proc.poll() is None, f"the server died with {self.proc.returncode}\n{self.stderr()}"
        assert "Fatal Python error" not in self.stderr(), self.stderr()
        return values

    def close(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


@pytest.fixture(scope="module")
def server(tiny_artifacts_with_diffusion: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(tiny_artifacts_with_diffusion, tmp_path_factory.mktemp("early_end_server"))
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def _print_server_stderr(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print what the server wrote to stderr during the test; pytest shows it when the test fails."""
    if "server" not in request.fixturenames:
        yield
        return
    srv: ServerProcess = request.getfixturevalue("server")
    before = len(srv.stderr())
    yield
    print(f"--- server stderr (pid {srv.proc.pid}) ---\n{srv.stderr()[before:]}")


def _counter(values: dict[str, float], name: str, **labels: str) -> float:
    key = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return values.get(f"{name}{{{key}}}", 0.0)


def _in_threads(n: int, work: Callable[[int], None]) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            work(i)
        except BaseException as exc:  # re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


# -- client cancellation ------------------------------------------------------------------------------


def test_cancel_explain_after_a_few_pieces(server: ServerProcess) -> None:
    before = server.metrics()
    threads, per_thread = 3, 30

    def work(_: int) -> None:
        for _ in range(per_thread):
            call = server.stub.Explain(explain_request(), timeout=30)
            pieces = 0
            for message in call:
                assert message.WhichOneof("event") == "text"
                pieces += 1
                if pieces == 3:
                    break
            call.cancel()
            assert call.code() == grpc.StatusCode.CANCELLED

    _in_threads(threads, work)
    after = server.assert_healthy_and_drained()
    cancelled = (_counter(after, "unimp_cancelled_requests_total", rpc="Explain", reason="client")
                 - _counter(before, "unimp_cancelled_requests_total", rpc="Explain", reason="client"))
    assert cancelled == threads * per_thread  # every stream's engine work was cancelled, none ran to the end
    assert (_counter(after, "unimp_requests_total", rpc="Explain", code="OK")
            == _counter(before, "unimp_requests_total", rpc="Explain", code="OK"))


def test_cancel_generate_image_after_progress(server: ServerProcess) -> None:
    before = server.metrics()
    threads, per_thread = 2, 20

    def work(_: int) -> None:
        for _ in range(per_thread):
            call = server.stub.GenerateImage(image_request(), timeout=60)
            first = next(call)
            assert first.WhichOneof("event") == "progress" and first.progress.step == 1
            call.cancel()

    _in_threads(threads, work)
    after = server.assert_healthy_and_drained()
    cancelled = (_counter(after, "unimp_cancelled_requests_total", rpc="GenerateImage", reason="client")
                 - _counter(before, "unimp_cancelled_requests_total", rpc="GenerateImage", reason="client"))
    assert cancelled == threads * per_thread


# -- deadlines ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("deadline_ms, repeats", [(1, 30), (50, 25), (500, 3)])
def test_deadline_ends_streams(server: ServerProcess, deadline_ms: int, repeats: int) -> None:
    before = server.metrics()
    # 500 ms: beam-search text (no pieces until the end, ~1.5 s) and 150 image steps outlive the deadline.
    explain = explain_request(num_beams=4) if deadline_ms >= 500 else explain_request()

    def work(i: int) -> None:
        for _ in range(repeats):
            stream = (server.stub.Explain(explain, timeout=deadline_ms / 1000) if i % 2 == 0
                      else server.stub.GenerateImage(image_request(), timeout=deadline_ms / 1000))
            with pytest.raises(grpc.RpcError) as err:
                for _message in stream:
                    pass
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    _in_threads(4, work)
    after = server.assert_healthy_and_drained()
    if deadline_ms >= 50:  # admitted (a 1 ms deadline may pass before the handler starts)
        for rpc in ("Explain", "GenerateImage"):
            cancelled = (_counter(after, "unimp_cancelled_requests_total", rpc=rpc, reason="deadline")
                         - _counter(before, "unimp_cancelled_requests_total", rpc=rpc, reason="deadline"))
            as_client = (_counter(after, "unimp_cancelled_requests_total", rpc=rpc, reason="client")
                         - _counter(before, "unimp_cancelled_requests_total", rpc=rpc, reason="client"))
            # the client's deadline clock starts before the server's, so its cancel can arrive first
            assert cancelled >= 1 and as_client <= cancelled, (rpc, cancelled, as_client)


# -- the client process dies --------------------------------------------------------------------------

_CLIENT = r"""
import sys, time
import grpc
sys.path.insert(0, sys.argv[2])
from tests.integration.test_early_stream_end import explain_request, image_request
from runtime.server.protos import personalization_pb2_grpc as ppb_grpc

channel = grpc.insecure_channel(sys.argv[1])
stub = ppb_grpc.PersonalizationStub(channel)
streams = [stub.Explain(explain_request(num_beams=4), timeout=60) for _ in range(4)]
image = stub.GenerateImage(image_request(), timeout=60)
next(image)
print("ready", flush=True)
time.sleep(60)
"""


def test_sigkill_of_a_client_holding_streams(server: ServerProcess) -> None:
    root = str(Path(__file__).resolve().parents[2])
    for _ in range(3):
        client = subprocess.Popen([sys.executable, "-c", _CLIENT, f"127.0.0.1:{server.port}", root],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert client.stdout is not None
            line = client.stdout.readline()
            assert line.strip() == "ready", client.stderr.read() if client.stderr else ""
            # all five streams are still running on the server when the client dies
            assert server.metrics()["unimp_inflight_requests"] == 5
            client.send_signal(signal.SIGKILL)
            client.wait(10)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait(10)
        server.assert_healthy_and_drained()


# -- the server stops while streams run ---------------------------------------------------------------


def test_sigterm_with_a_grace_shorter_than_the_streams(
    tiny_artifacts_with_diffusion: Path, tmp_path: Path
) -> None:
    srv = ServerProcess(tiny_artifacts_with_diffusion, tmp_path / "server", grace_s=0.5)
    try:
        srv.assert_healthy_and_drained()
        codes: list[grpc.StatusCode] = []

        def work(i: int) -> None:
            stream = (srv.stub.GenerateImage(image_request(), timeout=60) if i == 0
                      else srv.stub.Explain(explain_request(num_beams=4), timeout=60))
            try:
                for _message in stream:
                    pass
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())

        clients = threading.Thread(target=_in_threads, args=(5, work))
        clients.start()
        end = time.monotonic() + 20
        while srv.metrics().get("unimp_inflight_requests") != 5:
            assert time.monotonic() < end, srv.stderr()
            time.sleep(0.02)
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.stderr()
        clients.join(30)
        assert len(codes) == 5 and grpc.StatusCode.OK not in codes, codes  # every stream outlived the grace
        assert "Fatal Python error" not in srv.stderr(), srv.stderr()
    finally:
        print(f"--- server stderr ---\n{srv.stderr()}")
        srv.close()
