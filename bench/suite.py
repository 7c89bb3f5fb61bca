"""What every benchmark gets (a `Context`) and how one is run (`run_one`)."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.report import BenchResult

log = logging.getLogger("bench")
T = TypeVar("T")


@dataclass(frozen=True)
class Context:
    quick: bool
    workdir: Path  # private to one benchmark, removed after it

    def pick(self, full: T, quick: T) -> T:
        """The full-run or the --quick value of a parameter."""
        return quick if self.quick else full


Benchmark = Callable[[Context], BenchResult]


def run_one(name: str, bench: Benchmark, *, quick: bool) -> BenchResult:
    """Run one benchmark in a fresh temporary directory; an exception becomes an error result
    so the other benchmarks still run."""
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    started = time.monotonic()
    try:
        result = bench(Context(quick=quick, workdir=workdir))
    except Exception as exc:
        log.error("%s failed:\n%s", name, traceback.format_exc())
        result = BenchResult(name, error=f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    result.seconds = time.monotonic() - started
    return result
