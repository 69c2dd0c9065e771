"""FastAPI dependencies as ``Annotated`` aliases (async: sync ones would cost a thread hop)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.settings import Settings
from service.worker import FitWorker


async def get_worker(request: Request) -> FitWorker:
    worker: FitWorker = request.app.state.worker
    return worker


async def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


WorkerDep = Annotated[FitWorker, Depends(get_worker)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
