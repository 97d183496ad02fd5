"""`make demo`: serve the artifacts on 127.0.0.1:50051 (ONNX Runtime CPU, SQLite) and run a client session.

The server runs as a child process (`unimp serve`), exactly as a deployer would start it; the scripted
session prints a recommendation, a search, a rating with a streamed explanation and a selection, then
the server keeps serving until Ctrl-C (or exits at once with --no-wait). The session follows a held-out
test shopper of the demo shop (``ART/shop/test.jsonl``), printing the history's categories next to the
answers.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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


def pick_shopper(artifacts: Path) -> dict[str, Any] | None:
    """The first test-split shopper of ``ART/shop/test.jsonl`` (None for artifacts without a shop)."""
    path = artifacts / "shop" / "test.jsonl"
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as handle:
        return dict(json.loads(handle.readline()))


def _describe(client: UnimpClient, item_id: str) -> str:
    meta = client.get_item(item_id).item.meta
    return f"{item_id}  [{meta.category}] {meta.title}  ${meta.price}" if meta else item_id


def session(client: UnimpClient, shopper: dict[str, Any] | None = None) -> None:
    """A scripted client run for one shopper (a held-out test user of the demo shop when given)."""
    if shopper is None:
        shopper = {"user_id": "(example)", "history": [{"item_id": i, "rating": 4, "explanation": "Nice."}
                                                      for i in ("P00003", "P00017", "P00042", "P00008")],
                   "query": "Shoes Running Shoe", "rating_item": "P00021", "candidates": ["P00060", "P00061", "P00062"]}
    items = shopper["history"][-4:]
    history = [HistoryItem(item_id=h["item_id"]) for h in items]
    rated = [HistoryItem(item_id=h["item_id"], rating=h["rating"], explanation=h["explanation"]) for h in items]
    print(f"\n== Shopper {shopper['user_id']} (a held-out test user); the newest {len(items)} history items:")
    for h in items:
        print(f"  {_describe(client, h['item_id'])}   rated {h['rating']}: {h['explanation']}")
    cats = sorted({m.category for m in (client.get_item(h["item_id"]).item.meta for h in items) if m})
    print(f"  history categories: {', '.join(cats)}")

    print("\n== Recommend: the next items for this shopper")
    for item in client.recommend(history, top_k=5).items:
        print(f"  logp={item.score:7.3f}  {_describe(client, item.item_id)}")
    if "next_item" in shopper:
        print(f"  (held-out next item: {_describe(client, shopper['next_item'])})")

    print(f"\n== Search: {shopper['query']!r} with the same history")
    for item in client.search(shopper["query"], history, top_k=3).items:
        print(f"  logp={item.score:7.3f}  {_describe(client, item.item_id)}")

    target = shopper["rating_item"]
    print(f"\n== PredictPreference + streamed explanation for {_describe(client, target)}")
    print("  explanation: ", end="", flush=True)
    for event in client.explain(target, rated, sampling=SamplingOptions(max_new_tokens=32)):
        if isinstance(event, TextPiece):
            print(event.text, end="", flush=True)
        elif isinstance(event, PreferenceResult):
            dist = ", ".join(f"{p:.2f}" for p in event.rating_distribution)
            print(f"\n  rating {event.rating} (expected {event.expected_rating:.2f}; P(1..5) = {dist}); "
                  f"finish: {event.finish_reason}")
    if "rating" in shopper:
        print(f"  (held-out: rated {shopper['rating']}: {shopper['explanation']})")

    print("\n== SelectItems: which candidates suit the shopper")
    for k, c in enumerate(shopper["candidates"]):
        print(f"  s_{k}  {_describe(client, c)}")
    sel = client.select_items(list(shopper["candidates"]), history, max_selected=2)
    print(f"  selected candidates {list(sel.selected)}; scores {[round(s, 3) for s in sel.scores]}")
    if "selected" in shopper:
        print(f"  (held-out suitable candidates: {shopper['selected']})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--artifacts", type=Path, default=Path("out/demo"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--state-dir", type=Path, default=Path("out/state"))
    parser.add_argument("--no-wait", action="store_true", help="stop the server after the session")
    parser.add_argument("--log-level", default="WARNING", help="server log level (INFO shows one line per request)")
    args = parser.parse_args(argv)
    cmd = [sys.executable, "-m", "unimp", "serve", "--artifacts", str(args.artifacts),
           "--host", args.host, "--port", str(args.port), "--state-dir", str(args.state_dir),
           "--log-level", args.log_level, "--log-format", "text"]
    print("$", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    try:
        with UnimpClient(f"{args.host}:{args.port}") as client:
            ready = wait_serving(client, proc, timeout=120)
            print(f"server SERVING on {args.host}:{args.port} after {ready:.1f} s", flush=True)
            session(client, pick_shopper(args.artifacts))
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
