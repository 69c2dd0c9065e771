"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import WorkerDep
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
    responses={503: {"model": Health, "description": "Warming up or shutting down."}},
)
async def readyz(worker: WorkerDep) -> Health | JSONResponse:
    """200 once the compiled training loops are warmed up; 503 before that and while draining."""
    if worker.ready and not worker.draining:
        return Health(status="ready")
    status = "stopping" if worker.draining else "starting"
    return JSONResponse({"status": status}, status_code=503, headers={"Retry-After": "1"})
