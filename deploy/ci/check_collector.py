"""deploy/check.sh: the OpenTelemetry Collector's configuration and its place in
deploy/compose.cluster.yaml. No collector binary installs here (neither apt nor an image
registry has one), so its own `validate` cannot run: this checks what it would, for this
file's shape. Every pipeline names receivers, processors and exporters that are defined;
the OTLP receiver listens on HTTP 4318; the replicas export there; the collector mounts
this configuration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

DEPLOY = Path(__file__).resolve().parent.parent


def load(path: Path) -> Any:
    return YAML(typ="safe").load(path.read_text())


def problems() -> list[str]:
    found: list[str] = []
    config = load(DEPLOY / "otel-collector.yaml")
    for kind in ("receivers", "processors", "exporters"):
        if not isinstance(config.get(kind), dict) or not config[kind]:
            found.append(f"otel-collector.yaml: no {kind}")
    pipelines = (config.get("service") or {}).get("pipelines") or {}
    if "traces" not in pipelines:
        found.append("otel-collector.yaml: no traces pipeline")
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                if component not in (config.get(kind) or {}):
                    found.append(f"pipeline {name}: {kind[:-1]} {component!r} is not defined")
        if not pipeline.get("receivers") or not pipeline.get("exporters"):
            found.append(f"pipeline {name}: needs receivers and exporters")
    http = ((config.get("receivers") or {}).get("otlp") or {}).get("protocols", {}).get("http")
    if not http or not str(http.get("endpoint", "")).endswith(":4318"):
        found.append("otel-collector.yaml: the otlp receiver must take HTTP on :4318")
    compose = load(DEPLOY / "compose.cluster.yaml")
    services = compose.get("services") or {}
    collector = services.get("otel-collector")
    if collector is None:
        found.append("compose.cluster.yaml: no otel-collector service")
    else:
        mounts = [str(v) for v in collector.get("volumes", [])]
        if not any(v.startswith("./otel-collector.yaml:") for v in mounts):
            found.append("compose.cluster.yaml: the collector does not mount otel-collector.yaml")
    for name, service in services.items():
        if name.startswith("replica-"):
            endpoint = (service.get("environment") or {}).get("OTEL_EXPORTER_OTLP_ENDPOINT")
            if endpoint != "http://otel-collector:4318":
                found.append(f"compose.cluster.yaml: {name} exports to {endpoint!r}")
    return found


if __name__ == "__main__":
    errors = problems()
    for error in errors:
        print(f"FAIL {error}")
    print("collector configuration:", "FAILED" if errors else "ok")
    sys.exit(1 if errors else 0)
