"""deploy-check's smoke test of tapefit on 127.0.0.1:PORT (a container, or a pod played from
the Deployment): the probes' requests as the kubelet makes them, one real fit checked against
its closed form once every helper process is warm (the fit process too: it runs the fit), and
with ``--plot`` one plot (matplotlib in a read-only root).

    python deploy/ci/smoke.py PORT [--plot]
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request

PAYLOAD = {"x": [0, 0.25, 0.5, 0.75, 1], "y": [2.02, 2.27, 2.46, 2.79, 2.98], "seed": 1}
#: The Deployment's startupProbe: GET /readyz every 2 s, up to 60 failures.
PERIOD_S, FAILURES = 2, 60


def status(base: str, path: str) -> int | None:
    try:
        with urllib.request.urlopen(base + path, timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


def metrics(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        lines = r.read().decode().splitlines()
    return {
        name: float(value)
        for name, _, value in (line.partition(" ") for line in lines if not line.startswith("#"))
    }


def post(base: str, path: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(
        base + path,
        data=json.dumps(PAYLOAD).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        return int(r.status), r.headers["content-type"], r.read()


def main(port: int, plot: bool) -> None:
    base = f"http://127.0.0.1:{port}"
    for attempt in range(FAILURES):
        if status(base, "/readyz") == 200:
            print(f"startup probe: /readyz 200 after {attempt + 1} tries")
            break
        time.sleep(PERIOD_S)
    else:
        sys.exit(f"startup probe failed: /readyz never answered 200 within {PERIOD_S * FAILURES} s")
    assert status(base, "/readyz") == 200, "readiness probe failed"
    assert status(base, "/healthz") == 200, "liveness probe failed"
    print("readiness probe: /readyz 200; liveness probe: /healthz 200")
    for _ in range(FAILURES):
        if metrics(base).get("tapefit_warm_up_complete") == 1.0:
            break
        time.sleep(PERIOD_S)
    else:
        sys.exit("the warm-up after readiness (parser and fit processes) never completed")
    restarts = metrics(base)["tapefit_fit_process_restarts_total"]
    assert restarts == 0.0, f"the fit process restarted {restarts:g} times"
    print("warm: the fit process is up (0 restarts)")
    code, _, body = post(base, "/v1/fits/linear")
    params = json.loads(body)["params"]
    print("POST /v1/fits/linear ->", code, params)
    assert abs(params["slope"] - 0.976) < 1e-3 and abs(params["intercept"] - 2.016) < 1e-3
    if plot:
        code, media_type, png = post(base, "/v1/plots/linear")
        print("POST /v1/plots/linear ->", code, media_type, len(png), "bytes")
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


if __name__ == "__main__":
    main(int(sys.argv[1]), "--plot" in sys.argv[2:])
