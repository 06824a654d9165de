"""`mass-export run`: classify images with a build directory. Torch-free: only the runtime is imported."""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import click

from mass_export.core import options
from mass_export.core.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT, EXIT_PARTIAL, EXIT_TOTAL_FAILURE,
                                     BuildExists, OutputRefused, OutputWriteError)
from mass_export.core.jsonout import strict_dumps
from mass_export.core.outputs import is_within, locked

COLUMNS = ("path", "task", "class", "score", "confidence", "top_k", "task_set", "task_probs", "error", "warning")
NESTED = ("top_k", "task_set", "task_probs")  # JSON text in CSV and Parquet cells


# ---- row formats: a new one is one class + one registration ---------------------------------------------------

ROW_FORMATS: dict[str, type] = {}


def row_format(name: str):
    def register(cls):
        ROW_FORMATS[name] = cls
        return cls

    return register


@row_format("jsonl")
class JsonLines:
    """One JSON object per line (strict JSON: no NaN)."""

    def header(self) -> str:
        return ""

    def line(self, row: dict) -> str:
        return strict_dumps(row, "row") + "\n"


@row_format("csv")
class Csv:
    """A header, then one line per row; top_k and task_set as JSON text so a CSV reader gets them back losslessly."""

    def _line(self, values) -> str:
        buffer = io.StringIO()
        csv.writer(buffer).writerow(values)
        return buffer.getvalue()

    def header(self) -> str:
        return self._line(COLUMNS)

    def line(self, row: dict) -> str:
        row = {**row, **{name: strict_dumps(row[name], "row") for name in NESTED},
               **{name: "" if row[name] is None else repr(row[name]) for name in ("score", "confidence")}}
        return self._line(["" if row[c] is None else row[c] for c in COLUMNS])


# ---- rows ---------------------------------------------------------------------------------------------------------

def printable(text: str | None) -> str | None:
    """Text safe to write as UTF-8: bytes of a file name that are not UTF-8 (decoded by Python as surrogate escapes)
    are shown as \\xNN, Python's backslashreplace."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def output_row(prediction) -> dict:
    """The row of one prediction (or of a row a Ray worker made): file names printable, and no NaN/Inf score
    passed off as a result."""
    row = prediction.to_row() if hasattr(prediction, "to_row") else dict(prediction)
    path = printable(row["path"])
    notes = [row["warning"]] if row["warning"] else []
    if path != row["path"]:
        notes.append("file name is not valid UTF-8: its undecodable bytes are shown as \\xNN")
    row.update(path=path, error=printable(row["error"]), warning="; ".join(notes) or None)
    scores = ([row["score"], row["confidence"]] + [score for _, score in row["top_k"]]
              + list(row["task_probs"].values()) if row["score"] is not None else [])
    if not all(math.isfinite(s) for s in scores if s is not None):
        row.update(task=None, **{"class": None}, score=None, confidence=None, top_k=[], task_probs={},
                   error="the graphs produced NaN/Inf scores for this image")
    return row


# ---- the output -------------------------------------------------------------------------------------------------

class Output:
    """Rows to a file or stdout. Each row is one write, flushed; if a write fails (disk full) the file is cut back
    to its last whole row, so every line stays parseable, and OutputWriteError names the file and the problem."""

    def __init__(self, path: Path | None, fmt: str, force: bool, append: bool = False):
        self.path, self.format, self.rows, self.fd = path, ROW_FORMATS[fmt](), 0, None
        self.regular = path is not None and (not path.exists() or path.is_file())
        self.created, self.good, self.append = False, 0, append and path is not None and path.is_file()
        if path is None:
            return
        if self.regular and path.exists() and not (force or append):
            raise BuildExists(f"{path} exists; pass --force to overwrite it or --resume to add the missing rows")
        if self.regular and path.exists() and not os.access(path, os.W_OK):
            raise OutputRefused(f"{path}: read-only; not overwritten")
        existed = path.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | (0 if existed else os.O_EXCL) | getattr(os, "O_CLOEXEC", 0)
            self.fd = os.open(path, flags, 0o666)
        except OSError as error:
            raise OutputRefused(f"{path}: cannot write the output ({error.strerror})") from None
        self.created = not existed

    def start(self) -> None:
        """The build loaded: truncate what --force replaces (not before, so a refused build leaves it) and head;
        with --resume, carry on after the rows already there."""
        if self.append:
            self.good = os.lseek(self.fd, 0, os.SEEK_END)
            if self.good:
                return
        elif self.fd is not None and self.regular:
            os.ftruncate(self.fd, 0)
        self._write(self.format.header())

    def abandon(self) -> None:
        """Nothing was written (the build did not load): remove the file this run created."""
        self.close()
        if self.created:
            with contextlib.suppress(OSError):
                self.path.unlink()

    def write(self, rows) -> None:
        for row in rows:
            self._write(self.format.line(row))
            self.rows += 1

    def _write(self, text: str) -> None:
        if not text:
            return
        if self.fd is None:
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        data = memoryview(text.encode("utf-8"))
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError as error:
            if self.regular:
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self.good)
            raise OutputWriteError(f"{self.path}: writing failed after {self.rows} rows ({error.strerror}); "
                                   f"the {self.rows} rows before are whole and kept") from None
        self.good += len(text.encode("utf-8"))

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class ParquetOutput:
    """Rows as a Parquet file (pyarrow), one row group per batch. Parquet has no append: --resume refuses it, and a
    run killed before the end leaves a file without its footer, so the file is written beside and renamed at the end.
    """

    def __init__(self, path: Path, force: bool):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise OutputRefused(f"--output {path}: Parquet output needs pyarrow (pip install pyarrow)") from None
        if path.exists() and not force:
            raise BuildExists(f"{path} exists; pass --force to overwrite it")
        self.path, self.rows, self.writer = path, 0, None
        self.partial = path.with_name(f".{path.name}.{os.getpid()}.partial")

    def start(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        text, number = pa.string(), pa.float64()
        self.schema = pa.schema([(name, number if name in ("score", "confidence") else text) for name in COLUMNS])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = pq.ParquetWriter(str(self.partial), self.schema)

    def write(self, rows) -> None:
        import pyarrow as pa

        rows = list(rows)
        columns = {name: [strict_dumps(row[name], "row") if name in NESTED else row[name] for row in rows]
                   for name in COLUMNS}
        try:
            self.writer.write_table(pa.table(columns, schema=self.schema))
        except OSError as error:
            raise OutputWriteError(f"{self.path}: writing failed after {self.rows} rows ({error})") from None
        self.rows += len(rows)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
            os.replace(self.partial, self.path)

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        with contextlib.suppress(OSError):
            self.partial.unlink()


def open_output(path: Path | None, fmt: str, force: bool, append: bool):
    if fmt == "parquet":
        if append:
            raise click.UsageError("--resume cannot add to a Parquet file; write JSONL or CSV to resume")
        return ParquetOutput(path, force)
    return Output(path, fmt, force, append)


def output_format(fmt: str | None, output: Path | None) -> str:
    """--format, else the output's extension (.csv, .parquet), else jsonl."""
    if fmt:
        return fmt
    suffix = output.suffix.lower() if output else ""
    return {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix, "jsonl")


def refuse_output_over_inputs(output: Path, build_dir: Path, paths, items) -> None:
    """An output that is one of the images (or a PATH argument) would be overwritten before it is read; one inside
    the build would make the build fail its integrity check."""
    target = output.resolve()
    inputs = [Path(p) for p in paths] + [Path(os.fspath(i)) for i in items]
    same = next((p for p in inputs if p.resolve() == target), None)
    if same is not None:
        raise OutputRefused(f"--output {output}: it is the input {same}; choose another output")
    if is_within(target, build_dir.resolve()):
        raise OutputRefused(f"--output {output}: inside the build directory {build_dir}; choose another output")


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
    """The task-set cache's counters and the second pass's choices, for the summary (none with --ray: each
    worker keeps its own)."""
    if runtime is None:
        return {"cache": None, "cores": None, "gram_blocks": None, "second_pass": None}
    stats = runtime.stats()
    cache, cores = ({k: v for k, v in stats[part].items() if k not in ("keys", "max_entries")}
                    for part in ("cache", "cores"))
    return {"cache": cache, "cores": cores, "gram_blocks": stats["gram_blocks"],
            "second_pass": stats["second_pass"]["choices"]}


def exit_status(summary: dict) -> int:
    if summary["interrupted"]:
        return EXIT_INTERRUPTED
    if summary["output_error"]:
        return EXIT_OUTPUT
    if summary["images"] and not summary["classified"]:
        return EXIT_TOTAL_FAILURE
    return EXIT_PARTIAL if summary["failed"] else EXIT_OK


@click.command("run")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--build", "build_dir", required=True, type=click.Path(path_type=Path), help="Build directory.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write rows here (.jsonl or .csv by extension) instead of stdout. An existing file is refused "
              "unless --force; an output that is one of the images or inside the build is always refused.")
@click.option("--force", is_flag=True, help="Replace an existing --output file (only once the build has loaded).")
@click.option("--format", "fmt", type=click.Choice(sorted([*ROW_FORMATS, "parquet"])), default=None,
              help="Row format. Default: from --output's extension (.csv, .parquet), else jsonl. Parquet needs "
              "pyarrow.")
@click.option("--resume", is_flag=True, help="Add to an existing --output (JSONL or CSV): images that already have "
              "a row are skipped, a row torn by a killed run is cut off first.")
@click.option("--shard", default=None, metavar="I/N", help="Classify only shard I of N (1-based): a path's shard "
              "depends on the path alone, so N machines or jobs with I = 1..N cover the inputs exactly once.")
@click.option("--ray", "ray_address", default=None, metavar="ADDRESS", help="Run on Ray Data: 'local' starts a "
              "local Ray cluster, an address (ray://host:10001, auto) joins one. Needs the [ray] extra.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=options.RAY_WORKERS, show_default=True,
              help="Predictor actors (one loaded runtime each) with --ray.")
@click.option("--batch-size", type=click.IntRange(min=1), default=options.BATCH_SIZE, show_default=True)
@click.option("--providers", default="cpu", show_default=True,
              help="Comma list in order of preference: cpu, cuda, cuda:N, tensorrt (ONNX Runtime providers).")
@click.option("--strict-providers", is_flag=True, help="Fail (exit 5) if a requested provider cannot run, "
              "instead of warning and running on what is available.")
@click.option("--top-classes", "top_k", type=click.IntRange(min=1), default=options.TOP_CLASSES, show_default=True,
              help="Classes listed per image (of the winning head).")
@click.option("--top-k", "old_top_k", type=click.IntRange(min=1), default=None, hidden=True,
              help="Deprecated spelling of --top-classes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads per graph.")
@click.option("--cache-size", type=click.IntRange(min=0), default=None,
              help="At most this many prepared task sets (default: as many as --cache-bytes holds).")
@click.option("--cache-bytes", type=click.IntRange(min=0), default=None,
              help="Memory for prepared task sets, in bytes (default: a quarter of available memory, at most 8 GiB).")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Images routed before their second passes, grouped across the window by task set "
              "(default: 8 batches; --window equal to --batch-size runs batch by batch).")
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Refuse (as that image's error) a file that decodes to more pixels than this: small files can "
              "decode to gigabytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout "
              "(requires --output, so rows and summary never share stdout).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr. Default: when stderr is a "
              "terminal.")
def run(paths, build_dir, output, force, fmt, resume, shard, ray_address, ray_workers, batch_size, providers,
        strict_providers, top_k, old_top_k, threads, cache_size, cache_bytes, window, max_megapixels, as_json,
        progress):
    """Classify images: route each to its task(s), then predict the class.

    PATHS are image files, folders (searched recursively for .png .jpg .jpeg .bmp .gif .tif .tiff .webp), glob
    patterns ('photos/**/*.jpg'), @LIST (a file of paths, one a line) or - (paths on standard input).
    One row per image, in order: path, task, class, score (the winning logit), confidence (softmax of the winning
    head at that class), top_k, task_set, task_probs (the router's probability of each selected task), error,
    warning.
    Each row is written whole and flushed. Rows go to stdout as JSONL unless --output is given; the summary
    (images, failed, images/s, per-task counts) goes to stderr, or to stdout as JSON with --json. File names
    that are not valid UTF-8 are written with their undecodable bytes as \\xNN (and a warning in the row).

    \b
    Exit status:
      0   every image classified
      1   some images failed (their rows carry the error; the others were written)
      2   bad options or a refused output (exists without --force, is an input, cannot be written)
      3   the build is missing or changed since it was built
      5   a provider was refused (--strict-providers)
      6   no image could be classified
      7   the output could not be written part way (disk full): rows before are whole; the summary says so
      70  internal error (--debug or MASS_EXPORT_DEBUG=1 shows the traceback)
      75  another `run` is writing this --output, or the build is being rebuilt
      130 interrupted (rows written so far are kept)
      141 stdout closed by its reader (e.g. `| head`): stops quietly
    """
    if old_top_k is not None:
        click.echo("warning: run --top-k is deprecated, use --top-classes", err=True)
        top_k = old_top_k
    import onnxruntime

    from mass_export.runtime.sources import done_paths, expand_arguments, parse_shard, pending
    from mass_export.runtime.sources import shard as shard_items

    fmt = output_format(fmt, output)
    if as_json and output is None:
        raise click.UsageError("--json prints the summary on stdout: give --output for the rows")
    if resume and (output is None or force):
        raise click.UsageError("--resume adds to an existing --output: give --output, and not --force")
    onnxruntime.set_default_logger_severity(3)  # ORT's own fallback chatter; provider checks report it clearly

    max_pixels = int(max_megapixels * 1e6)
    items = expand_arguments([os.fspath(p) for p in paths], sys.stdin)
    if shard:
        items = shard_items(items, *parse_shard(shard))
    started = time.perf_counter()
    regular = output is not None and (not output.exists() or output.is_file())
    with locked(output, what="being written") if regular else contextlib.nullcontext():
        if output is not None:
            refuse_output_over_inputs(output, build_dir, paths, items)
        skipped = 0
        if resume:
            before = len(items)
            items = pending(items, done_paths(output, fmt))
            skipped = before - len(items)
        sink = open_output(output, fmt, force, resume)  # checked writable before minutes of loading, not after
        try:
            with locked(build_dir, shared=True, what="being rebuilt"), _warnings_as_lines():
                runtime, tasks, active = load_runner(build_dir, ray_address, ray_workers, providers,
                                                     strict_providers, cache_size, cache_bytes, threads, max_pixels)
            sink.start()
        except BaseException:
            sink.abandon()
            raise
        batches = prediction_batches(runtime, items, build_dir, ray_address, ray_workers, batch_size, providers,
                                     threads, top_k, window, max_pixels)
        summary = classify_all(batches, len(items), tasks, active, sink, progress)
        summary.update(_runtime_counters(runtime))
        sink.close()
    summary.update(load_seconds=round(summary.pop("started") - started, 3), build=str(build_dir),
                   output=str(output) if output else None, format=fmt, skipped_done=skipped, shard=shard)
    report(summary, as_json)
    sys.exit(exit_status(summary))


def load_runner(build_dir: Path, ray_address: str | None, ray_workers: int, providers: str, strict_providers: bool,
                cache_size, cache_bytes, threads, max_pixels: int):
    """(the loaded runtime, or None with --ray; the build's tasks; what runs the graphs, for the summary)."""
    if ray_address:
        from mass_export.core.manifest import read_manifest
        from mass_export.distributed.ray_job import connect

        manifest = read_manifest(build_dir)  # the integrity check before any worker starts
        connect(ray_address, ray_workers)  # cluster start-up counts as loading, not classifying
        return None, manifest["tasks"], [f"ray:{ray_address} x{ray_workers}"]
    from mass_export.runtime import MassRuntime

    runtime = MassRuntime.load(build_dir, providers=providers, strict_providers=strict_providers,
                               cache_size=cache_size, cache_bytes=cache_bytes, threads=threads)
    runtime.max_pixels = max_pixels
    return runtime, runtime.tasks, runtime.providers["encoder"]


def prediction_batches(runtime, items: list, build_dir: Path, ray_address: str | None, ray_workers: int,
                       batch_size: int, providers: str, threads, top_k: int, window, max_pixels: int):
    """Predictions (with --ray, the rows the workers made) ``batch_size`` at a time, in input order: the runtime's
    batch loop, on this machine or inside each Ray worker."""
    from mass_export.runtime.sources import batched

    if runtime is not None:
        return runtime.classify_batches(items, batch_size, top_k, window=window)
    from mass_export.distributed.ray_job import classify_on_ray

    rows = classify_on_ray(items, build_dir, ray_address, ray_workers, batch_size,
                           [p.strip() for p in providers.split(",")], threads, top_k, max_pixels)
    return batched(rows, batch_size)


def classify_all(batches, total: int, tasks: list[str], providers: list[str], sink, progress) -> dict:
    """Write every batch's rows; the summary counts them (images, failures, per task)."""
    from tqdm import tqdm

    counts, failed, warned, done = Counter(), 0, 0, 0
    interrupted, output_error = False, None
    bar = tqdm(total=total, unit="img", file=sys.stderr, disable=(not progress) if progress is not None
               else None, desc="classifying")
    run_started = time.perf_counter()
    try:
        for batch in batches:
            rows = [output_row(p) for p in batch]
            sink.write(rows)
            done += len(rows)
            failed += sum(r["error"] is not None for r in rows)
            warned += sum(r["warning"] is not None for r in rows)
            counts.update(r["task"] for r in rows if r["error"] is None)
            bar.update(len(rows))
    except KeyboardInterrupt:
        interrupted = True
    except OutputWriteError as error:
        output_error = str(error)
        click.echo(f"error: {error}", err=True)
    finally:
        bar.close()
    seconds = time.perf_counter() - run_started
    classified = sum(counts.values())
    return {"images": done, "classified": classified, "failed": failed, "warnings": warned,
            "rows_written": sink.rows, "seconds": round(seconds, 3),
            "images_per_s": round(classified / seconds, 2) if seconds > 0 else None, "started": run_started,
            "per_task": {t: counts[t] for t in tasks}, "providers": providers,
            "interrupted": interrupted, "output_error": output_error}


def report(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(strict_dumps(summary, "summary"))
        return
    per_task = ", ".join(f"{t} {n}" for t, n in summary["per_task"].items())
    click.echo(f"{summary['images']} images: {summary['classified']} classified, {summary['failed']} failed, "
               f"{summary['warnings']} with warnings; {summary['images_per_s']} images/s on "
               f"{', '.join(summary['providers'])}" + (" (interrupted)" if summary["interrupted"] else "")
               + (f"; output incomplete: {summary['rows_written']} rows written" if summary["output_error"] else ""),
               err=True)
    click.echo(f"per task: {per_task}", err=True)
    if summary.get("cache"):
        cache = summary["cache"]
        click.echo(f"task sets: {cache['hits']} cache hits, {cache['misses']} misses, {cache['preparations']} "
                   f"prepared in {cache['prepare_seconds']:.2f} s; second passes {summary['second_pass']}", err=True)
