"""``python -m service``: serve tapefit with uvicorn, configured from ``TAPEFIT_*``."""

from __future__ import annotations

import uvicorn

from service.settings import get_settings


def main() -> None:
    settings = get_settings()
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        workers=1,  # scale with replicas: TensorFlow is not fork-safe
    )


if __name__ == "__main__":
    main()
