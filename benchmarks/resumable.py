"""Resumable benchmark runs: every finished run is one JSON line of a results file, and a run already there is skipped
when the benchmark starts again, so an interrupted benchmark resumes where it stopped."""

import json
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pending(jobs: list[dict], results: list[dict], keys: tuple[str, ...]) -> list[dict]:
    """The jobs whose `keys` match no finished result."""
    done = {tuple(result[key] for key in keys) for result in results}
    return [job for job in jobs if tuple(job[key] for key in keys) not in done]


def run_and_record(jobs: list[dict], worker: Callable[..., dict], shared_args: tuple, path: Path, processes: int,
                   describe: Callable[[dict], str]) -> list[dict]:
    """`worker(job, *shared_args)` for every job, `processes` at a time (in this process when 1, so a short run needs
    no process start-up), appending each result to `path` as soon as it is in; returns the new results."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = []

    def record(result: dict):
        new.append(result)
        with path.open("a") as file:
            file.write(json.dumps(result) + "\n")
        print(describe(result), file=sys.stderr)

    if processes == 1:
        for job in jobs:
            record(worker(job, *shared_args))
        return new
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        for future in [pool.submit(worker, job, *shared_args) for job in jobs]:
            record(future.result())
    return new
