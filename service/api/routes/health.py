"""Liveness and readiness probes, and the Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.deps import RegistryDep, WorkerDep
from service.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> Health:
    """Always 200 while the process serves HTTP; does no work."""
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Readiness",
    responses={
        503: {
            "model": Health,
            "description": "Warming up (`starting`), shutting down (`stopping`), or replacing "
            "a fit process that died or hung (`degraded`).",
        }
    },
)
async def readyz(worker: WorkerDep) -> Health | JSONResponse:
    """200 once the compiled training loops are warmed up; 503 before that, while draining,
    and while a lost fit process is being replaced (small fits then run in the server,
    slower: other replicas should take the traffic)."""
    process = worker.fit_process
    degraded = process is not None and process.replacing
    if worker.ready and not worker.draining and not degraded:
        return Health(status="ready")
    status = "stopping" if worker.draining else "degraded" if worker.ready else "starting"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Metrics in the Prometheus text format."}},
)
async def metrics(registry: RegistryDep) -> Response:
    """The service's metrics (fits, admission, memory, parsing, HTTP requests) in the
    Prometheus text format."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
