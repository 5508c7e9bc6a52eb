"""Out-of-core EM at fixed memory: GaussianMixtureEM on a float32 memmap, peak RSS measured.

    python -m inference.bench.out_of_core --rows 10000000 --dim 64 --components 64 \
        --iters 3 --path /tmp/ooc.f32 --out bench-out/out-of-core/one-process.json
    torchrun --standalone --nproc_per_node=2 -m inference.bench.out_of_core \
        --rows 10000000 --dim 64 --components 64 --iters 3 --path /tmp/ooc.f32 \
        --out bench-out/out-of-core/two-processes.json
    /usr/bin/time -v python -m inference.bench.out_of_core ...   # the kernel's figure too

The data: ``--rows`` points of a ``--components``-cluster mixture in ``--dim`` dimensions
(random means, diagonal scales, equal weights; ``--seed``), written to ``--path`` as raw
float32 in C order, in blocks of ``--block-rows`` rows (never whole in memory). A sidecar
``<path>.json`` records how the file was made; a file with the same record is reused
(``--make`` writes it again, ``--make-only`` writes it and stops, ``--delete`` removes it
at the end). Under ``torchrun`` rank 0 writes it while the others wait.

The fit: ``GaussianMixtureEM(components, covariance_type="diag", max_iter=iters, tol=0)``
on ``numpy.memmap(path, float32, "r")`` (k-means start on at most 100,000 rows). Under
``torchrun`` (gloo) each process fits its contiguous slice of the rows
(``shard_bounds``) and the statistics are summed across processes every iteration.

The report (printed and written to ``--out``, by rank 0): the fit's wall time, the time to
the first iteration (validation and data mean: one pass; the initialization), the seconds
of each iteration, the lower bounds, and per process its peak resident memory
(``getrusage(RUSAGE_SELF).ru_maxrss``, which counts the file's pages that are mapped and
resident as well as allocated memory), its resident memory before the fit and its CPU
seconds. The phases are timed by wrapping ``ChunkedData.mean`` (``inference.em.readers``)
and ``run_em`` of ``inference.em.estimator`` for the duration of the fit; the fit itself is
unchanged.
``/usr/bin/time -v`` around the command reports the same peak ("Maximum resident set
size", the largest process of a torchrun launch).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import inference.em.estimator as estimator
from inference.em.distributed import (
    all_reduce_sum,
    process_group_from_environment,
    rank_and_size,
    shard_bounds,
)
from inference.em.readers import ChunkedData

GIB = 2**30


def data_record(rows: int, dim: int, clusters: int, seed: int, block_rows: int) -> dict:
    """What the data file holds (kept next to it as ``<path>.json``)."""
    return {
        "rows": rows, "dim": dim, "clusters": clusters, "seed": seed, "block_rows": block_rows,
        "dtype": "float32", "order": "C",
    }


def make_memmap(path: Path, record: dict) -> None:
    """Write the points that ``record`` describes to ``path`` (raw float32, C order), one
    block of rows at a time: the clusters' random means and diagonal scales, then for each
    block the labels (equal weights) and the points."""
    rows, dim, clusters = record["rows"], record["dim"], record["clusters"]
    block_rows = record["block_rows"]
    rng = np.random.default_rng(record["seed"])
    means = rng.normal(scale=3.0, size=(clusters, dim)).astype(np.float32)
    scales = rng.uniform(0.5, 1.5, size=(clusters, dim)).astype(np.float32)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "wb") as file:
        for start in range(0, rows, block_rows):
            n = min(block_rows, rows - start)
            labels = rng.integers(0, clusters, n)
            noise = rng.standard_normal((n, dim), dtype=np.float32)
            (means[labels] + scales[labels] * noise).tofile(file)
    partial.replace(path)
    sidecar(path).write_text(json.dumps(record))


def sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def is_made(path: Path, record: dict) -> bool:
    """Whether ``path`` holds the data that ``record`` describes."""
    try:
        stored = json.loads(sidecar(path).read_text())
    except (OSError, ValueError):
        return False
    size = record["rows"] * record["dim"] * 4
    return path.exists() and path.stat().st_size == size and all(
        stored.get(key) == value for key, value in record.items()
    )


@contextlib.contextmanager
def phase_clock(marks: list[tuple[str, float]]):
    """Record ``(phase, time)`` as a fit passes: the data mean (its first pass over the
    data), the start of EM (the initialization done), every iteration's start, EM's end."""
    mean, run_em = ChunkedData.mean, estimator.run_em

    def timed_mean(self, size):
        value = mean(self, size)
        marks.append(("mean", time.perf_counter()))
        return value

    def timed_run_em(chunks, *args, **kwargs):
        marks.append(("initialized", time.perf_counter()))

        def each_iteration():
            marks.append(("iteration", time.perf_counter()))
            return chunks()

        run = run_em(each_iteration, *args, **kwargs)
        marks.append(("end", time.perf_counter()))
        return run

    ChunkedData.mean, estimator.run_em = timed_mean, timed_run_em
    try:
        yield marks
    finally:
        ChunkedData.mean, estimator.run_em = mean, run_em


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux)."""
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def gather(values: list[float]) -> list[list[float]]:
    """Every process's ``values``, in rank order (a sum where the others put zeros)."""
    rank, size = rank_and_size()
    table = torch.zeros(size, len(values), dtype=torch.float64)
    table[rank] = torch.tensor(values, dtype=torch.float64)
    return all_reduce_sum(table).tolist()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--components", type=int, default=64, help="K of the data and the fit")
    parser.add_argument("--iters", type=int, default=3, help="EM iterations (tol=0)")
    parser.add_argument("--path", type=Path, default=Path("/tmp/ooc.f32"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-rows", type=int, default=65_536, help="rows per write")
    parser.add_argument("--init-params", default="kmeans", choices=estimator.INIT_PARAMS)
    parser.add_argument("--threads", type=int, help="torch threads per process")
    parser.add_argument("--limit-gib", type=float, default=1.5, help="the peak RSS target")
    parser.add_argument("--make", action="store_true", help="write the file even if made")
    parser.add_argument("--make-only", action="store_true", help="write the file and stop")
    parser.add_argument("--delete", action="store_true", help="remove the file at the end")
    parser.add_argument("--progress", action="store_true", help="a progress bar (rank 0)")
    parser.add_argument("--out", type=Path, help="write the report (JSON) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with process_group_from_environment(torch.device("cpu")):
        return run(args)


def run(args: argparse.Namespace) -> dict | None:
    rank, size = rank_and_size()
    record = data_record(args.rows, args.dim, args.components, args.seed, args.block_rows)
    if rank == 0 and (args.make or args.make_only or not is_made(args.path, record)):
        started = time.perf_counter()
        make_memmap(args.path, record)
        print(f"wrote {args.path} in {time.perf_counter() - started:.1f} s", flush=True)
    if size > 1:
        dist.barrier()
    if args.make_only:
        return None

    data = np.memmap(args.path, dtype=np.float32, mode="r", shape=(args.rows, args.dim))
    start, stop = shard_bounds(args.rows)
    shard = data[start:stop]  # this process's rows, still a memmap
    gm = estimator.GaussianMixtureEM(
        args.components,
        covariance_type="diag",
        max_iter=args.iters,
        tol=0.0,
        init_params=args.init_params,
        random_state=args.seed,
        verbose=int(args.progress),
    )
    rss_before = peak_rss()
    cpu_before = time.process_time()
    if size > 1:
        dist.barrier()
    marks: list[tuple[str, float]] = []
    with phase_clock(marks), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 by design
        began = time.perf_counter()
        gm.fit(shard)
        seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu_before
    rss = peak_rss()

    times = dict(marks)
    starts = [t for name, t in marks if name == "iteration"] + [times["end"]]
    per_iteration = np.diff(starts).tolist()
    processes = gather([start, stop, rss, rss_before, cpu, seconds])
    report = {
        "rows": args.rows,
        "dim": args.dim,
        "components": args.components,
        "covariance_type": "diag",
        "init_params": args.init_params,
        "file": str(args.path),
        "file_bytes": args.rows * args.dim * 4,
        "processes": size,
        "threads_per_process": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "seconds": max(row[5] for row in processes),
        "seconds_mean_pass": times["mean"] - began,
        "seconds_initialization": times["initialized"] - times["mean"],
        "seconds_per_iteration": per_iteration,
        "mean_seconds_per_iteration": float(np.mean(per_iteration)) if per_iteration else None,
        "n_iter": gm.n_iter_,
        "lower_bounds": gm.lower_bounds_,
        "lower_bound": gm.lower_bound_,
        "peak_rss_bytes": max(row[2] for row in processes),
        "peak_rss_limit_bytes": int(args.limit_gib * GIB),
        "per_process": [
            {
                "rank": r,
                "rows": [int(row[0]), int(row[1])],
                "peak_rss_bytes": int(row[2]),
                "rss_before_fit_bytes": int(row[3]),
                "cpu_seconds": row[4],
                "seconds": row[5],
            }
            for r, row in enumerate(processes)
        ],
    }
    report["within_limit"] = report["peak_rss_bytes"] < report["peak_rss_limit_bytes"]
    if size > 1:
        dist.barrier()
    if rank == 0:
        print(json.dumps(report, indent=1), flush=True)
        peaks = ", ".join(f"{p['peak_rss_bytes'] / GIB:.2f}" for p in report["per_process"])
        print(
            f"N={args.rows:,} D={args.dim} K={args.components}, {size} process(es): "
            f"peak RSS {peaks} GiB (file {report['file_bytes'] / GIB:.2f} GiB), "
            f"{report['seconds']:.1f} s, {report['mean_seconds_per_iteration'] or 0:.1f} s per "
            f"iteration, lower bound {report['lower_bound']:.6f}",
            flush=True,
        )
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=1))
        if args.delete:
            args.path.unlink(missing_ok=True)
            sidecar(args.path).unlink(missing_ok=True)
    return report


if __name__ == "__main__":
    main()
