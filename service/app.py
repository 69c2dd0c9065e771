"""The application factory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from asgi_correlation_id import CorrelationIdMiddleware
from fastapi import FastAPI, Request, Response
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__, tracing
from service.api.bodies import BodyParsers
from service.api.errors import install_error_handlers
from service.api.limits import BodyLimit
from service.api.models import BUILT_IN, HttpModel
from service.api.observe import HttpMetrics, ObservedRequests, TracedRequests
from service.api.openapi import install_openapi
from service.api.routes import (
    compare,
    datasets,
    evaluate,
    expressions,
    fits,
    global_fits,
    health,
    plots,
)
from service.api.schemas import (
    MAX_EPOCH_COUNT,
    CompareRequest,
    EvaluateRequest,
    ExpressionBatchRequest,
    ExpressionFitRequest,
    GaussianDatasetRequest,
    GlobalFitRequest,
    LinearDatasetRequest,
)
from service.logs import valid_request_id
from service.settings import Settings, get_settings
from service.worker import FitWorker

log = logging.getLogger(__name__)

DESCRIPTION = """
Fits models with custom TensorFlow training loops (`tf.GradientTape`): POST the data and,
optionally, hyperparameters; get the fitted parameters and the loss history back as JSON.

- **linear**: y = slope·x + intercept, gradient descent on the mean squared error;
- **gaussian**: N(mean, std²), gradient descent on the negative log-likelihood;
- **expression**: any model you write down (or a named one), by Levenberg-Marquardt with the
  exact Jacobian by automatic differentiation, certified on NIST's nonlinear reference data sets.
"""


TAGS = [
    {"name": "fits", "description": "Fit a model to data: parameters, loss history, statistics."},
    {"name": "plots", "description": "Fit, then draw the reference post's figures as PNG."},
    {"name": "expressions", "description": "Any model written down, or a named one."},
    {"name": "evaluate", "description": "A fitted model at new x, with its bands."},
    {"name": "datasets", "description": "The reference post's synthetic data, seeded."},
    {"name": "health", "description": "Liveness, readiness and Prometheus metrics."},
]


#: gzip level 1: a 10,000-set batch answer (10.8 MB) compresses at 130 MB/s to a quarter
#: (level 5: 48 MB/s, to 21%). Sent over 1 Gb/s, level 1 is done in ~105 ms against ~245 ms;
#: even at 100 Mb/s, ~300 ms against ~410 ms. On loopback level 5 added 0.35 s to that answer.
GZIP_LEVEL = 1


def create_app(
    settings: Settings | None = None, models: Mapping[str, HttpModel] = BUILT_IN
) -> FastAPI:
    """Build the app serving ``models``; the worker warms up in the background (``/readyz``
    says when), and the parser processes start after readiness."""
    settings = settings or get_settings()
    registry = CollectorRegistry()
    worker = FitWorker(settings, registry)
    bodies = BodyParsers(settings, registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(worker.start(bodies.start), name="worker-start")
        app.state.worker_started = starting
        try:
            yield
        finally:
            worker.begin_drain()
            if not starting.done():
                starting.cancel()
            await worker.stop()
            await bodies.stop()

    # FastAPIOffline: /docs and /redoc with Swagger UI / ReDoc assets served by the app itself
    # (from the fastapi-offline package), so the pages work without any CDN.
    app = FastAPIOffline(
        title="tapefit",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        openapi_tags=TAGS,
        servers=[{"url": "/", "description": "This server"}],
        contact={"name": "tapefit maintainers"},
        license_info={"name": "Proprietary", "identifier": "LicenseRef-Proprietary"},
        # operationIds are the route functions' names (fit_linear, not
        # fit_linear_v1_fits_linear_post): what generated clients call their methods.
        generate_unique_id_function=lambda route: route.name,
    )
    app.state.settings = settings
    app.state.worker = worker
    app.state.bodies = bodies
    app.state.registry = registry
    install_error_handlers(app)
    app.include_router(fits.router(models.values()))
    app.include_router(compare.router)
    app.include_router(expressions.router)
    app.include_router(global_fits.router)
    app.include_router(evaluate.router)
    app.include_router(plots.router(models.values()))
    app.include_router(datasets.router)
    app.include_router(health.router)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, deadline=settings.body_deadline)
    # Large answers (datasets, batches, long histories) compress ~4x; in a thread above
    # 128 KiB, so compression never stalls the event loop. PNGs and event streams are left.
    app.add_middleware(
        GZipMiddleware, minimum_size=settings.gzip_min_bytes, compresslevel=GZIP_LEVEL
    )
    # Outermost last: the request id exists before the access line is written.
    app.add_middleware(ObservedRequests, metrics=HttpMetrics(registry, lambda: _paths(app)))
    if tracing.enabled():  # inside the request id's middleware: spans carry the id
        app.add_middleware(TracedRequests)
    app.add_middleware(
        CorrelationIdMiddleware, header_name="X-Request-ID", validator=valid_request_id
    )
    requests = [schema for m in models.values() for schema in (m.request, m.batch_request)]
    install_openapi(
        app,
        [
            *requests,
            ExpressionFitRequest,
            ExpressionBatchRequest,
            LinearDatasetRequest,
            GaussianDatasetRequest,
            EvaluateRequest,
            CompareRequest,
            GlobalFitRequest,
        ],
        {MAX_EPOCH_COUNT: min(settings.max_epochs, MAX_EPOCH_COUNT)},
    )
    _cache_openapi(app)
    app.add_middleware(DocsContentSecurityPolicy)
    app.add_middleware(HeadAsGet)
    if settings.cors_origins:  # outermost: preflights are answered before anything else
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "HEAD"],
            allow_headers=["Content-Type", "Accept", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
            max_age=600,
        )
    return app


def _cache_openapi(app: FastAPI) -> None:
    """Serve the OpenAPI document with an ETag, and answer 304 to a client that has it
    (FastAPI's own route sends the whole document every time)."""
    url = app.openapi_url
    assert url is not None
    app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", None) != url]
    served: list[tuple[bytes, str]] = []  # made on first use (the document is built lazily)

    async def openapi(request: Request) -> Response:
        if not served:
            document = json.dumps(app.openapi(), separators=(",", ":")).encode()
            served.append((document, f'"{hashlib.sha256(document).hexdigest()[:32]}"'))
        document, etag = served[0]
        headers = {"ETag": etag, "Cache-Control": "no-cache"}
        wanted = request.headers.get("if-none-match", "")
        if any(tag.strip().removeprefix("W/") in (etag, "*") for tag in wanted.split(",")):
            return Response(status_code=304, headers=headers)
        return Response(document, media_type="application/json", headers=headers)

    app.add_route(url, openapi, include_in_schema=False)


class HeadAsGet:
    """HEAD wherever GET works (probes, /metrics, the docs pages): answered as GET without
    the body, as Starlette does for its own routes (FastAPI's routes answer HEAD with 405)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class DocsContentSecurityPolicy:
    """Keep the docs pages on this origin: the browser may load nothing from elsewhere (ReDoc's
    bundle would otherwise fetch its logo from a CDN)."""

    PAGES = frozenset({"/docs", "/redoc"})
    POLICY = (
        b"default-src 'self'; script-src 'self' 'unsafe-inline'; "
        b"style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
        b"worker-src 'self' blob:; connect-src 'self'"
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in self.PAGES:
            await self.app(scope, receive, send)
            return

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (b"content-security-policy", self.POLICY)]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_policy)


def _paths(app: FastAPI) -> frozenset[str]:
    """Every path the app serves (none has parameters): the documented ones and the docs'."""
    served = {
        path for route in app.router.routes if isinstance(path := getattr(route, "path", None), str)
    }
    return frozenset(app.openapi()["paths"]) | served
