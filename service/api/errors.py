"""Exception -> HTTP mapping. No handler ever echoes the request's input back."""

from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service.api.limits import drain, too_large
from service.api.parser_pool import ParserFailed
from service.api.parsing import sanitize_errors
from service.worker import FitDiverged, FitError, Refused, Unavailable


class UnsupportedMediaType(Exception):
    def __init__(self, content_type: str, accepted: tuple[str, ...]) -> None:
        super().__init__(f"unsupported Content-Type {content_type!r}; send {' or '.join(accepted)}")


class ClientDisconnected(Exception):
    """The client went away before the answer was ready; nobody reads the response."""


class BodyTimeout(Exception):
    """The request body did not arrive in time (408)."""


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": sanitize_errors(exc.errors())}, status_code=422)


def fit_error_body(exc: FitError) -> dict[str, object]:
    """A fit that cannot answer: a sentence, plus the stop reason and epoch if it diverged."""
    if isinstance(exc, FitDiverged):
        return {"detail": str(exc), "stop_reason": "diverged", "epoch": exc.epoch}
    return {"detail": str(exc)}


async def _fit_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FitError)
    return JSONResponse(fit_error_body(exc), status_code=422)


async def _refused(request: Request, exc: Exception) -> JSONResponse:
    """Admission said no: 413 if this request could never fit, else 429 with Retry-After."""
    assert isinstance(exc, Refused)
    await _drain(request)
    if exc.never:
        return JSONResponse({"detail": str(exc)}, status_code=413)
    return JSONResponse(
        {"detail": str(exc)}, status_code=429, headers={"Retry-After": str(exc.retry_after)}
    )


async def _drain(request: Request) -> None:
    """Drop what is left of a body this answer does not need (see :func:`limits.drain`),
    within the body deadline. A client that sent ``Expect: 100-continue`` is waiting for this
    answer instead of uploading, so it is not asked for the body."""
    if request.headers.get("expect", "").lower() == "100-continue":
        return
    settings = request.app.state.settings
    declared = request.headers.get("content-length", "")
    length = int(declared) if declared.isdigit() else settings.max_body_bytes
    with contextlib.suppress(ClientDisconnect, RuntimeError):  # RuntimeError: already read
        await drain(request.stream(), settings.body_deadline(length))


async def _parser_failed(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})


async def _body_timeout(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=408, headers={"Connection": "close"})


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, Unavailable)
    await _drain(request)
    return JSONResponse(
        {"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)}
    )


async def _media_type(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=415)


async def _disconnected(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nginx's "client closed request"; never delivered


async def _http(request: Request, exc: Exception) -> Response:
    """Starlette's own errors; a body that outgrew the limit while being read (chunked, or
    longer than declared) says which limit, as a declared one does."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 413:
        limit = request.app.state.settings.max_body_bytes
        return JSONResponse({"detail": too_large(limit)}, status_code=413)
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http)
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(FitError, _fit_error)
    app.add_exception_handler(Refused, _refused)
    app.add_exception_handler(ParserFailed, _parser_failed)
    app.add_exception_handler(BodyTimeout, _body_timeout)
    app.add_exception_handler(Unavailable, _unavailable)
    app.add_exception_handler(UnsupportedMediaType, _media_type)
    app.add_exception_handler(ClientDisconnected, _disconnected)
    app.add_exception_handler(ClientDisconnect, _disconnected)
