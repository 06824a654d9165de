"""`mass-export run`: classify images with a build directory. Torch-free: only the runtime is imported."""

from __future__ import annotations

import contextlib
import csv
import json
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import click

from mass_export.core.errors import MassExportError

COLUMNS = ("path", "task", "class", "score", "top_k", "task_set", "error", "warning")


class _Rows:
    """Writes prediction rows as JSONL or CSV, flushed after every batch."""

    def __init__(self, handle, fmt: str):
        self.handle, self.fmt = handle, fmt
        self.csv = csv.DictWriter(handle, COLUMNS) if fmt == "csv" else None
        if self.csv:
            self.csv.writeheader()

    def write(self, rows) -> None:
        for row in rows:
            if self.csv:
                # Nested fields as JSON text so a CSV reader gets them back losslessly.
                self.csv.writerow({**row, "top_k": json.dumps(row["top_k"]), "task_set": json.dumps(row["task_set"]),
                                   "score": "" if row["score"] is None else repr(row["score"])})
            else:
                self.handle.write(json.dumps(row) + "\n")
        self.handle.flush()


@contextlib.contextmanager
def _warnings_as_lines():
    """Runtime warnings (provider fallback) as one 'warning: ...' line on stderr, not a Python traceback line."""
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *args, **kwargs: click.echo(f"warning: {message}", err=True)
    try:
        yield
    finally:
        warnings.showwarning = previous


def _runtime_counters(runtime) -> dict:
    """The task-set cache's counters and the second pass's choices, for the summary."""
    stats = runtime.stats()
    cache = {k: v for k, v in stats["cache"].items() if k not in ("keys", "max_entries")}
    return {"cache": cache, "second_pass": stats["second_pass"]["choices"]}


@click.command("run")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--build", "build_dir", required=True, type=click.Path(path_type=Path), help="Build directory.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write rows here (.jsonl or .csv by extension) instead of stdout.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default=None,
              help="Row format. Default: from --output's extension, else jsonl.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--providers", default="cpu", show_default=True,
              help="Comma list in order of preference: cpu, cuda, cuda:N, tensorrt (ONNX Runtime providers).")
@click.option("--strict-providers", is_flag=True, help="Fail (exit 5) if a requested provider cannot run, "
              "instead of warning and running on what is available.")
@click.option("--top-k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes listed per image (of the winning head).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads per graph.")
@click.option("--cache-size", type=click.IntRange(min=0), default=None,
              help="At most this many prepared task sets (default: as many as --cache-bytes holds).")
@click.option("--cache-bytes", type=click.IntRange(min=0), default=None,
              help="Memory for prepared task sets, in bytes (default: a quarter of available memory, at most 8 GiB).")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Images routed before their second passes, grouped across the window by task set "
              "(default: 8 batches; --window equal to --batch-size runs batch by batch).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout "
              "(requires --output, so rows and summary never share stdout).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr. Default: when stderr is a "
              "terminal.")
def run(paths, build_dir, output, fmt, batch_size, providers, strict_providers, top_k, threads, cache_size,
        cache_bytes, window, as_json, progress):
    """Classify images: route each to its task(s), then predict the class.

    PATHS are image files or folders (searched recursively for .png .jpg .jpeg .bmp .gif .tif .tiff .webp).
    One row per image, in order: path, task, class, score (the winning logit), top_k, task_set, error, warning.
    Rows go to stdout as JSONL unless --output is given; the summary (images, failed, images/s, per-task
    counts) goes to stderr, or to stdout as JSON with --json.

    Exit status: 0 every image classified; 1 some images failed (the others were still written); 3 the build
    is missing or changed since it was built; 5 a provider was refused (--strict-providers); 2 other errors;
    130 interrupted (rows written so far are kept).
    """
    import onnxruntime
    from tqdm import tqdm

    from mass_export.runtime import MassRuntime, expand_paths

    fmt = fmt or ("csv" if output and output.suffix.lower() == ".csv" else "jsonl")
    if as_json and output is None:
        raise click.UsageError("--json prints the summary on stdout: give --output for the rows")
    onnxruntime.set_default_logger_severity(3)  # ORT's own fallback chatter; provider checks report it clearly

    started = time.perf_counter()
    try:
        with _warnings_as_lines():
            runtime = MassRuntime.load(build_dir, providers=providers, strict_providers=strict_providers,
                                       cache_size=cache_size, cache_bytes=cache_bytes, threads=threads)
    except MassExportError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    items = expand_paths(paths)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
    counts, failed, warned, done = Counter(), 0, 0, 0
    interrupted = False
    with (open(output, "w", newline="") if output else contextlib.nullcontext(sys.stdout)) as handle:
        writer = _Rows(handle, fmt)
        bar = tqdm(total=len(items), unit="img", file=sys.stderr, disable=(not progress) if progress is not None
                   else None, desc="classifying")
        run_started = time.perf_counter()
        try:
            for batch in runtime.classify_batches(items, batch_size, top_k, window=window):
                writer.write(p.to_row() for p in batch)
                done += len(batch)
                failed += sum(not p.ok for p in batch)
                warned += sum(p.warning is not None for p in batch)
                counts.update(p.task for p in batch if p.ok)
                bar.update(len(batch))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    seconds = time.perf_counter() - run_started
    classified = sum(counts.values())
    summary = {
        "images": done, "classified": classified, "failed": failed, "warnings": warned,
        "seconds": round(seconds, 3), "images_per_s": round(classified / seconds, 2) if seconds > 0 else None,
        "load_seconds": round(run_started - started, 3), "per_task": {t: counts[t] for t in runtime.tasks},
        "providers": runtime.providers["encoder"], "build": str(build_dir), "output": str(output) if output else None,
        "interrupted": interrupted, **_runtime_counters(runtime),
    }
    if as_json:
        click.echo(json.dumps(summary))
    else:
        per_task = ", ".join(f"{t} {n}" for t, n in summary["per_task"].items())
        click.echo(f"{summary['images']} images: {classified} classified, {failed} failed, {warned} with warnings; "
                   f"{summary['images_per_s']} images/s on {', '.join(summary['providers'])}"
                   + (" (interrupted)" if interrupted else ""), err=True)
        cache = summary["cache"]
        click.echo(f"task sets: {cache['hits']} cache hits, {cache['misses']} misses, {cache['preparations']} "
                   f"prepared in {cache['prepare_seconds']:.2f} s; second passes {summary['second_pass']}", err=True)
        click.echo(f"per task: {per_task}", err=True)
    sys.exit(130 if interrupted else 1 if failed else 0)
