"""The OpenAPI document as client generators read it: openapi-python-client generates a client
from it without a warning, and that client fits, plots, sends binary data and reads a 422
from the real server."""

from __future__ import annotations

import importlib
import inspect
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from service.app import create_app
from tests.conftest import seed_linear_data
from tests.reference import linear_closed_form
from tests.server import Server

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "docs" / "clients" / "openapi-python-client.yaml"
PACKAGE = "tapefit_generated_client"


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ModuleType]]:
    """(the generator's output, the generated package's root module)."""
    out = tmp_path_factory.mktemp("generated")
    document = out / "openapi.json"
    document.write_text(json.dumps(create_app().openapi()))
    generator = Path(sys.executable).with_name("openapi-python-client")
    arguments = ["--path", str(document), "--meta", "none", "--config", str(CONFIG)]
    run = subprocess.run(
        [str(generator), "generate", *arguments, "--output-path", str(out / PACKAGE)],
        capture_output=True,
        text=True,
        cwd=out,
        timeout=120,
        env={"PATH": str(Path(sys.executable).parent)},  # its ruff post-hook: the venv's
    )
    assert run.returncode == 0, run.stdout + run.stderr
    sys.path.insert(0, str(out))
    try:
        yield run.stdout + run.stderr, importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.startswith(PACKAGE)]:
            del sys.modules[name]


def _module(name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


def test_the_document_generates_without_a_warning(generated: tuple[str, ModuleType]) -> None:
    output, _ = generated
    assert "Warning" not in output and "WARNING" not in output, output
    fit_linear = _module("api.fits.fit_linear")
    # Clean method names, and no query option on a JSON operation.
    assert list(_signature(fit_linear.sync)) == ["client", "body"]
    binary = _signature(_module("api.fits.fit_linear_binary").sync)
    assert {"body", "learning_rate", "epochs", "initial", "dtype"} <= set(binary)


def _signature(function: Any) -> dict[str, Any]:
    return dict(inspect.signature(function).parameters)


def test_the_generated_client_fits_plots_and_reads_a_422(
    generated: tuple[str, ModuleType], live_server: Server
) -> None:
    _, package = generated
    models = _module("models")
    types = _module("types")
    x, y = seed_linear_data(2)
    x, y = 3000.0 + 1000.0 * x, 1e7 + 0.1 * y  # units real callers send, not unit scale
    slope, intercept = linear_closed_form(x, y)
    with package.Client(base_url=live_server.url, raise_on_unexpected_status=True) as client:
        body = models.LinearFitRequest.from_dict({"x": x.tolist(), "y": y.tolist(), "seed": 1})
        fit = _module("api.fits.fit_linear").sync(client=client, body=body)
        assert isinstance(fit, models.LinearFitResponse)
        assert fit.params.slope == pytest.approx(slope, rel=1e-9)
        assert fit.params.intercept == pytest.approx(intercept, rel=1e-9)
        assert fit.stats.std_errors.slope > 0  # always present, typed as such

        npy = io.BytesIO()
        np.save(npy, np.stack([x, y]))
        data = types.File(payload=io.BytesIO(npy.getvalue()), mime_type="application/x-npy")
        from_binary = _module("api.fits.fit_linear_binary").sync(client=client, body=data, seed=1)
        assert from_binary.to_dict() == fit.to_dict()

        png = _module("api.plots.plot_linear").sync(client=client, body=body)
        assert isinstance(png, types.File)
        assert png.payload.read(8) == b"\x89PNG\r\n\x1a\n"

        invalid = models.LinearFitRequest.from_dict({"x": [1.0, 2.0], "y": [1.0]})
        refused = _module("api.fits.fit_linear").sync_detailed(client=client, body=invalid)
        assert refused.status_code == 422
        assert isinstance(refused.parsed, models.ValidationErrorBody)
        assert refused.parsed.detail[0].loc == ["body", "y"]  # the field named
