"""`make demo`: serve the artifacts on 127.0.0.1:50051 (ONNX Runtime CPU, SQLite) and run a client session.

The server runs as a child process (`unimp serve`), exactly as a deployer would start it; the scripted
session prints a recommendation, a search, a rating with a streamed explanation and a selection, then
the server keeps serving until Ctrl-C (or exits at once with --no-wait).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runtime.client import UnimpClient
from runtime.types import HistoryItem, PreferenceResult, SamplingOptions, TextPiece


def wait_serving(client: UnimpClient, proc: subprocess.Popen[bytes], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}; see its log above")
        try:
            if client.health(timeout=1.0) == "SERVING":
                return time.monotonic() - start
        except Exception:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not report SERVING within {timeout:.0f} s")


def session(client: UnimpClient) -> None:
    history = [HistoryItem(item_id=i) for i in ("P00003", "P00017", "P00042", "P00008")]
    print("\n== Recommend: next item for a shopper who viewed P00003, P00017, P00042, P00008")
    for item in client.recommend(history, top_k=5).items:
        title = item.meta.title if item.meta else ""
        print(f"  {item.item_id}  logp={item.score:7.3f}  {title}")

    print("\n== Search: 'waterproof running shoe' with the same history")
    for item in client.search("waterproof running shoe", history, top_k=3).items:
        print(f"  {item.item_id}  logp={item.score:7.3f}  {item.meta.title if item.meta else ''}")

    rated = [HistoryItem(item_id="P00005", rating=4, explanation="Great fit and soft fabric."),
             HistoryItem(item_id="P00009", rating=2, explanation="Runs small.")]
    print("\n== PredictPreference + streamed explanation for P00021")
    print("  explanation: ", end="", flush=True)
    for event in client.explain("P00021", rated, sampling=SamplingOptions(max_new_tokens=24)):
        if isinstance(event, TextPiece):
            print(event.text, end="", flush=True)
        elif isinstance(event, PreferenceResult):
            dist = ", ".join(f"{p:.2f}" for p in event.rating_distribution)
            print(f"\n  rating {event.rating} (expected {event.expected_rating:.2f}; P(1..5) = {dist}); "
                  f"finish: {event.finish_reason}")

    print("\n== SelectItems: which of P00060, P00061, P00062 suits the shopper")
    sel = client.select_items(["P00060", "P00061", "P00062"], history, max_selected=2)
    print(f"  selected candidates {list(sel.selected)}; scores {[round(s, 3) for s in sel.scores]}")
    print("\n(the model is the seeded random 'tiny' demo: answers are well-formed, not meaningful)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", type=Path, default=Path("out/demo"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--state-dir", type=Path, default=Path("out/state"))
    parser.add_argument("--no-wait", action="store_true", help="stop the server after the session")
    parser.add_argument("--log-level", default="WARNING", help="server log level (INFO shows one line per request)")
    args = parser.parse_args(argv)
    cmd = [sys.executable, "-m", "runtime.cli", "serve", "--artifacts", str(args.artifacts),
           "--host", args.host, "--port", str(args.port), "--state-dir", str(args.state_dir),
           "--log-level", args.log_level, "--log-format", "text"]
    print("$", " ".join(cmd[2:]).replace("runtime.cli", "unimp"), flush=True)
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        with UnimpClient(f"{args.host}:{args.port}") as client:
            ready = wait_serving(client, proc, timeout=120)
            print(f"server SERVING on {args.host}:{args.port} after {ready:.1f} s", flush=True)
            session(client)
        if not args.no_wait:
            print(f"\nserver still running on {args.host}:{args.port}; Ctrl-C to stop", flush=True)
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
