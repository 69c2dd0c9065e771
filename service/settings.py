"""Runtime settings, read from the environment (prefix ``TAPEFIT_``)."""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Annotated

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.fitting.expression import CACHE_BYTES


def available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


#: JSON bodies parse and validate at ~420 MB/s here (pydantic, then numpy; measured flat from
#: 40 KB to 800 KB bodies of a linear fit, 2026-12-07: 399 KB in 0.95 ms, 798 KB in 1.92 ms;
#: it was ~195 MB/s when first measured): what parses within 2 ms, the bound under which a fit
#: runs on the event loop too (``inline_fit_max_s``), parses there. A body sent to the parser
#: process instead costs a round trip of 2-6 ms: a 10,000-point fit took 9.2 ms there and
#: 3.3 ms parsed here (medians, side by side).
INLINE_PARSE_MAX_BYTES = 800_000


class Settings(BaseSettings):
    """Every knob of the service; each field is the env var ``TAPEFIT_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="TAPEFIT_", extra="ignore", frozen=True)

    host: str = Field("0.0.0.0", description="Interface uvicorn binds to.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="TCP port.")
    log_level: str = Field("info", description="uvicorn / service log level.")

    max_points: Annotated[int, Field(ge=2)] = Field(
        1_000_000, description="Most data points one fit may carry."
    )
    max_epochs: Annotated[int, Field(ge=1)] = Field(
        100_000, description="Most epochs one fit may ask for."
    )
    max_work: Annotated[int, Field(ge=1)] = Field(
        100_000_000_000,
        description="Most points x epochs in one fit (422 above). The engine's cost grows as "
        "points + epochs, so the default (the product of the two limits) never binds; lower it "
        "to cap requests anyway.",
    )
    max_batch: Annotated[int, Field(ge=1)] = Field(
        10_000, description="Most data sets in one batch request (422 above)."
    )
    max_batch_history: Annotated[int, Field(ge=1)] = Field(
        2_000_000,
        description="Most loss-history values one batch response may carry (data sets x "
        "recorded epochs; 422 above: raise history_every).",
    )
    max_dataset_points: Annotated[int, Field(ge=2)] = Field(
        100_000, description="Most points one synthetic data set may have (422 above)."
    )
    max_expression_work: Annotated[int, Field(ge=1)] = Field(
        4_000_000,
        description="Most points x parameters in one expression fit (422 above): its "
        "Jacobian holds that many float64 values (32 MB at the default) and each "
        "Levenberg-Marquardt iteration a few copies of it.",
    )
    max_starts: Annotated[int, Field(ge=1)] = Field(
        64,
        description="Most starts of one multi-start expression fit (`starts`; 422 above). "
        "Its points x parameters x starts count against TAPEFIT_MAX_EXPRESSION_WORK.",
    )
    compile_threads: Annotated[int, Field(ge=1)] = Field(
        1,
        description="Expression fits that compile (a new expression or size bucket: traced "
        "and XLA-compiled, seconds) run on this many threads of their own, apart from the fit "
        "slots, so compiling never holds up cached fits.",
    )
    uncompiled_max_work: Annotated[int, Field(ge=0)] = Field(
        2_000_000,
        description="A new expression's fits by Levenberg-Marquardt answer at once from the "
        "numpy loop (no tracing, no XLA: milliseconds, the compiled loop's answer to "
        "rounding) while its loop compiles in the background, when their points x "
        "complexity (parameters x nodes) are at most this: an epoch then costs at most "
        "~20 ms and its exact Hessian arrays a few MB. Larger ones wait for the compile, "
        "whose loop is faster on large data. 0: every first fit waits for its compile.",
    )
    max_queued_compiles: Annotated[int, Field(ge=0)] = Field(
        4,
        description="Compiling fits that may wait for a compile thread; more answer 429 with "
        "Retry-After.",
    )
    max_expression_complexity: Annotated[int, Field(ge=1)] = Field(
        640,
        description="Most parameters x nodes in one expression (422 above): compiling its fit "
        "takes time and memory in proportion (measured ~9 ms and ~0.5-1.1 MiB a unit; "
        "docs/expressions.md). The default admits NIST's largest certified model (ENSO, 603) "
        "and keeps a compile within ~8 s and ~512 MiB, charged to the memory budget.",
    )
    expression_cache_size: Annotated[int, Field(ge=1)] = Field(
        64, description="Compiled expressions kept (least recently used evicted first)."
    )
    expression_cache_bytes: Annotated[int, Field(ge=0)] = Field(
        CACHE_BYTES,
        description="Memory compiled expressions may keep (estimated; the least recently used "
        "are evicted first), counted in the memory budget. XLA never gives back what it "
        "compiled, so expressions are XLA-compiled while that stays within half of this, and "
        "run as plain graphs after (given back when evicted).",
    )
    max_body_bytes: Annotated[int, Field(ge=1024)] = Field(
        64 * 1024 * 1024, description="Largest request body accepted (413 above)."
    )

    max_concurrent_fits: Annotated[int, Field(ge=1)] = Field(
        default_factory=available_cpus, description="Fits that run at the same time."
    )
    max_queued_fits: Annotated[int, Field(ge=0)] = Field(
        512,
        description="A backstop: fits that may wait for a slot, beyond which the service "
        "answers 429. Admission is by expected time (TAPEFIT_MAX_QUEUE_WAIT_S) and memory "
        "first; this count binds only for floods of the tiniest fits.",
    )
    inline_fit_max_s: Annotated[float, Field(ge=0)] = Field(
        0.002,
        description="Fits expected to take at most this long skip the fit thread pool (a "
        "thread handoff and a disconnect watcher would cost more than the fit): they run in "
        "the fit process (TAPEFIT_FIT_PROCESSES), or on the event loop itself. 0: every fit "
        "runs in the fit thread pool.",
    )
    max_queue_wait_s: Annotated[float, Field(gt=0)] = Field(
        10.0,
        description="A fit is refused (429, Retry-After = the expected wait) when the work "
        "already admitted would keep it waiting longer than this for a slot. The wait is "
        "estimated from a cost model of each fit, scaled by how long recent fits really took.",
    )
    memory_budget_bytes: Annotated[int, Field(ge=0)] = Field(
        0,
        description="Memory that admitted requests may hold, by their estimated peaks (429 "
        "when in use by others, 413 when one request alone needs more). 0: 95% of the "
        "memory limit less what the warm server and its parser processes hold.",
    )
    memory_limit_bytes: Annotated[int, Field(ge=0)] = Field(
        0,
        description="The memory limit the automatic budget starts from. 0: the container's "
        "(cgroup v2 or v1), else the machine's RAM.",
    )
    body_timeout_s: Annotated[float, Field(gt=0)] = Field(
        10.0,
        description="A request body must arrive within this many seconds, plus one second per "
        "TAPEFIT_BODY_MIN_BYTES_PER_S received; a slower upload gets 408 and frees its "
        "memory.",
    )
    body_min_bytes_per_s: Annotated[int, Field(ge=1)] = Field(
        1024 * 1024, description="The slowest upload rate accepted beyond body_timeout_s."
    )
    fit_timeout_s: Annotated[float, Field(gt=0)] = Field(
        60.0, description="Wall-clock budget of one fit, queueing included."
    )
    shutdown_drain_s: Annotated[float, Field(ge=0)] = Field(
        1.0,
        description="After SIGTERM, seconds during which /readyz and new fits answer 503 while "
        "the listener stays open (lets load balancers notice) before shutdown begins.",
    )
    shutdown_grace_s: Annotated[float, Field(ge=0)] = Field(
        30.0,
        description="After the listener closes, how long in-flight requests may take to finish.",
    )
    keep_alive_s: Annotated[float, Field(gt=0)] = Field(
        75.0,
        description="How long an idle keep-alive connection stays open (uvicorn's default, 5 s, "
        "drops clients' pooled connections; load balancers idle for 60 s).",
    )
    gzip_min_bytes: Annotated[int, Field(ge=0)] = Field(
        1024, description="Responses at least this large are gzip-compressed when asked."
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser, as a JSON list (e.g. "
        '["https://app.example"]; ["*"] for any). Empty: no CORS headers.',
    )
    epochs_per_call: Annotated[int, Field(ge=1, le=65536)] = Field(
        4096,
        description="Epochs run per call of the compiled loop; deadlines and cancellation "
        "are checked between calls.",
    )

    intra_op_threads: Annotated[int, Field(ge=0)] = Field(
        default_factory=available_cpus, description="TensorFlow intra-op threads (0 = TF default)."
    )
    inter_op_threads: Annotated[int, Field(ge=0)] = Field(
        2, description="TensorFlow inter-op threads (0 = TF default)."
    )

    parse_inline_max_bytes: Annotated[int, Field(ge=0)] = Field(
        INLINE_PARSE_MAX_BYTES,
        description="JSON bodies up to this size are parsed in the server process; larger ones "
        "in a separate parser process so that parsing never stalls other requests. The "
        "default is what parses in ~2 ms, the longest the event loop runs anything inline.",
    )
    parse_processes: Annotated[int, Field(ge=0)] = Field(
        1, description="Parser processes for large JSON bodies (0 = parse in a thread)."
    )
    fit_processes: Annotated[int, Field(ge=0, le=1)] = Field(
        default_factory=lambda: 1 if available_cpus() >= 2 else 0,
        description="1: fits too small for a thread (TAPEFIT_INLINE_FIT_MAX_S) run in a "
        "process of their own, on another CPU than the event loop: more small fits a second "
        "(docs/performance.md), for ~520 MiB more memory. 0: on the event loop. Default: 1 on "
        "two CPUs or more.",
    )

    def body_deadline(self, length: int) -> float:
        """Seconds a request body of ``length`` bytes may take to arrive."""
        return self.body_timeout_s + length / self.body_min_bytes_per_s


@lru_cache
def get_settings() -> Settings:
    return Settings()
