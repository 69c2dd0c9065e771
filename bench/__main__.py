"""Run the benchmark and print its tables (Markdown)."""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import engine, expressions, find, http, sets, tracing


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, shorter loads")
    parser.add_argument("--no-http", action="store_true", help="engine table only")
    args = parser.parse_args()

    started = time.perf_counter()
    print(f"# tapefit benchmark ({'quick' if args.quick else 'full'})")
    print(f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    rows, first = engine.run(args.quick)
    print(engine.table(rows, first))
    print()
    print(expressions.run(http=not args.no_http))
    print()
    print(find.run())
    print()
    print(sets.report(sets.run(args.quick, http=not args.no_http)))
    print()
    if not args.no_http:
        print(http.report(http.run(args.quick)))
        print()
        print(tracing.report(tracing.run(3 if args.quick else 10)))
    print(f"\n(benchmark took {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
