"""The app's memory over many Runs: ``python -m benchmarks.app_memory [--quick] [--threads 2] [--same 6] [--new 12] [--out FILE]``.

The app's handlers in this process (as ``benchmarks.first_answer --in-process``: the
official architectures at random initialisation, every registered method, k = 3, the
default runtime), after the warm start: ``--same`` Runs against one set of normals (second
queries: nothing new to fit), then ``--new`` Runs each with normals of its own (new fits,
kept by the fitted-detector cache up to its size, ``limits.FITTED_DETECTOR_CACHE_SIZE``
entries, the
least recently used dropped first). After every Run: resident memory (RSS), the bytes
held by live torch tensors (each storage once) and the cache's entries.

Memory that grows with the cache and stops when it is full is the cache; growth that goes
on after it is full would be a leak. The table's last lines give the growth per Run in each
phase.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from .first_answer import app_handlers, benchmark_images, timed_run
from .measure import benchmarked_checkpoints, format_value, write_and_print

#: Seed of the first ``--new`` Run's normals (one more per Run).
NEW_NORMALS_SEED = 100


def resident_mib() -> float:
    """This process's resident memory now, MiB (psutil, as the reliability tests measure it)."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def tensor_mib() -> float:
    """Bytes of the storages of every live torch tensor the garbage collector knows, MiB
    (a storage shared by several tensors counted once)."""
    import torch

    sizes: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for tensor in tensors:
        if tensor.device.type != "cpu":
            continue
        try:
            storage = tensor.untyped_storage()
            sizes[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:  # no memory of its own (a fake tensor left by tracing an export)
            continue
    return sum(sizes.values()) / 2**20


def growth_per_run(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean change of ``key`` from one row to the next (``None`` with fewer than 2 rows)."""
    if len(rows) < 2:
        return None
    return (rows[-1][key] - rows[0][key]) / (len(rows) - 1)


def run(quick: bool, threads: int, same: int, new: int) -> dict[str, Any]:
    import torch

    from detector.registry import get_spec, list_methods

    torch.set_num_threads(threads)
    names = [get_spec(method).display_name for method in list_methods()]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        handlers = app_handlers(quick, benchmarked_checkpoints(quick, folder))
        handlers.warm_start()
        while handlers.warm_status.startswith("warming"):
            time.sleep(0.1)

        def record(phase: str, index: int, seconds: float | None) -> None:
            gc.collect()
            rows.append({
                "phase": phase, "run": index, "rss_mib": resident_mib(), "tensor_mib": tensor_mib(),
                "cached_fits": len(handlers.service.cached_keys()), "run_s": seconds,
            })

        record("warm", 0, None)
        normals, queries = benchmark_images(folder / "same")
        for index in range(same):
            record("same", index + 1, timed_run(handlers, normals, queries[index % 2], names, "same")["all_s"])
        for index in range(new):
            own_normals, own_queries = benchmark_images(folder / f"new-{index}", seed=NEW_NORMALS_SEED + index)
            record("new", index + 1, timed_run(handlers, own_normals, own_queries[0], names, f"new-{index}")["all_s"])
        cache_size = handlers.service.cache_size
    full = [row for row in rows if row["phase"] == "new" and row["cached_fits"] >= cache_size]
    filling = [row for row in rows if row["phase"] == "new" and row["cached_fits"] < cache_size]
    phases = {"same normals": [row for row in rows if row["phase"] == "same"], "new normals, cache filling": filling, "new normals, cache full": full}
    growth = {
        name: {"rss_mib": growth_per_run(part, "rss_mib"), "tensor_mib": growth_per_run(part, "tensor_mib")}
        for name, part in phases.items()
    }
    return {"quick": quick, "threads": threads, "cache_size": cache_size, "methods": names, "rows": rows, "growth_per_run": growth}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"The app's handlers, {', '.join(result['methods'])}, {result['threads']} threads; fitted-detector cache of "
        f"{result['cache_size']} entries",
        "",
        "| phase | Run | resident MiB | torch tensors MiB | cached fits | Run s |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['phase']} | {row['run']} | {row['rss_mib']:.0f} | {row['tensor_mib']:.0f} | {row['cached_fits']} | {format_value(row['run_s'])} |"
        )
    lines += ["", "| growth per Run | resident MiB | torch tensors MiB |", "|---|---|---|"]
    for name, growth in result["growth_per_run"].items():
        lines.append(f"| {name} | {format_value(growth['rss_mib'])} | {format_value(growth['tensor_mib'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.app_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny random backbone (seconds)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--same", type=int, default=6, help="Runs against one set of normals (default 6)")
    parser.add_argument("--new", type=int, default=12, help="Runs with normals of their own (default 12)")
    parser.add_argument("--out", default="benchmarks/app_memory.json")
    args = parser.parse_args(argv)
    if args.same < 0 or args.new < 0:
        parser.error("--same and --new must be >= 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args.quick, args.threads, args.same, args.new)
    return write_and_print(result, args.out, markdown(result))


if __name__ == "__main__":
    raise SystemExit(main())
