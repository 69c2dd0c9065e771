"""``python -m bench.probe URL``: ``GET URL/healthz`` every 5 ms, from a process of its own,
until its standard input closes. Prints ``ready`` once probing, then one JSON list of
``[start, seconds]`` per probe (``time.monotonic``: one clock for every process here).

A probe sent from the process that also sends a big request would time that process too:
its event loop writing 40 MB, its collector freeing the millions of floats that body was
made from. From here, a slow probe is the server's."""

from __future__ import annotations

import json
import sys
import threading
import time

import httpx

#: Pause between probes.
EVERY_S = 0.005


def main() -> None:
    stop = threading.Event()

    def wait_for_stdin_to_close() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_stdin_to_close, daemon=True).start()
    samples: list[tuple[float, float]] = []
    with httpx.Client(base_url=sys.argv[1], timeout=60) as client:
        client.get("/healthz")  # connected
        print("ready", flush=True)
        while not stop.is_set():
            t0 = time.monotonic()
            client.get("/healthz")
            samples.append((t0, time.monotonic() - t0))
            time.sleep(EVERY_S)
    print(json.dumps(samples), flush=True)


if __name__ == "__main__":
    main()
