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

from mass_export.core.errors import (EXIT_INTERRUPTED, EXIT_OK, EXIT_OUTPUT, EXIT_PARTIAL, EXIT_TOTAL_FAILURE,
                                     BuildExists, OutputRefused, OutputWriteError)
from mass_export.core.jsonout import strict_dumps
from mass_export.core.outputs import is_within, locked

COLUMNS = ("path", "task", "class", "score", "top_k", "task_set", "error", "warning")


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
        row = {**row, "top_k": strict_dumps(row["top_k"], "row"), "task_set": strict_dumps(row["task_set"], "row"),
               "score": "" if row["score"] is None else repr(row["score"])}
        return self._line(["" if row[c] is None else row[c] for c in COLUMNS])


# ---- rows ---------------------------------------------------------------------------------------------------------

def printable(text: str | None) -> str | None:
    """Text safe to write as UTF-8: bytes of a file name that are not UTF-8 (decoded by Python as surrogate escapes)
    are shown as \\xNN, Python's backslashreplace."""
    if text is None:
        return None
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def output_row(prediction) -> dict:
    """The row of one prediction: file names printable, and no NaN/Inf score passed off as a result."""
    row = prediction.to_row()
    path = printable(row["path"])
    notes = [row["warning"]] if row["warning"] else []
    if path != row["path"]:
        notes.append("file name is not valid UTF-8: its undecodable bytes are shown as \\xNN")
    row.update(path=path, error=printable(row["error"]), warning="; ".join(notes) or None)
    scores = [row["score"]] + [score for _, score in row["top_k"]] if row["score"] is not None else []
    if not all(math.isfinite(s) for s in scores):
        row.update(task=None, **{"class": None}, score=None, top_k=[],
                   error="the graphs produced NaN/Inf scores for this image")
    return row


# ---- the output -------------------------------------------------------------------------------------------------

class Output:
    """Rows to a file or stdout. Each row is one write, flushed; if a write fails (disk full) the file is cut back
    to its last whole row, so every line stays parseable, and OutputWriteError names the file and the problem."""

    def __init__(self, path: Path | None, fmt: str, force: bool):
        self.path, self.format, self.rows, self.fd = path, ROW_FORMATS[fmt](), 0, None
        self.regular = path is not None and (not path.exists() or path.is_file())
        self.created, self.good = False, 0
        if path is None:
            return
        if self.regular and path.exists() and not force:
            raise BuildExists(f"{path} exists; pass --force to overwrite it")
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
        """The build loaded: truncate what --force replaces (not before, so a refused build leaves it) and head."""
        if self.fd is not None and self.regular:
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
@click.option("--format", "fmt", type=click.Choice(sorted(ROW_FORMATS)), default=None,
              help="Row format. Default: from --output's extension, else jsonl.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--providers", default="cpu", show_default=True,
              help="Comma list in order of preference: cpu, cuda, cuda:N, tensorrt (ONNX Runtime providers).")
@click.option("--strict-providers", is_flag=True, help="Fail (exit 5) if a requested provider cannot run, "
              "instead of warning and running on what is available.")
@click.option("--top-classes", "top_k", type=click.IntRange(min=1), default=5, show_default=True,
              help="Classes listed per image (of the winning head).")
@click.option("--top-k", "old_top_k", type=click.IntRange(min=1), default=None, hidden=True,
              help="Deprecated spelling of --top-classes.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads per graph.")
@click.option("--cache-size", type=click.IntRange(min=0), default=4, show_default=True,
              help="Task sets whose weights stay prepared.")
@click.option("--max-megapixels", type=click.FloatRange(min=0, min_open=True), default=64.0, show_default=True,
              help="Refuse (as that image's error) a file that decodes to more pixels than this: small files can "
              "decode to gigabytes.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object on stdout "
              "(requires --output, so rows and summary never share stdout).")
@click.option("--progress/--no-progress", default=None, help="Progress bar on stderr. Default: when stderr is a "
              "terminal.")
def run(paths, build_dir, output, force, fmt, batch_size, providers, strict_providers, top_k, old_top_k, threads,
        cache_size, max_megapixels, as_json, progress):
    """Classify images: route each to its task(s), then predict the class.

    PATHS are image files or folders (searched recursively for .png .jpg .jpeg .bmp .gif .tif .tiff .webp).
    One row per image, in order: path, task, class, score (the winning logit), top_k, task_set, error, warning.
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

    from mass_export.runtime import MassRuntime, expand_paths

    fmt = fmt or ("csv" if output and output.suffix.lower() == ".csv" else "jsonl")
    if as_json and output is None:
        raise click.UsageError("--json prints the summary on stdout: give --output for the rows")
    onnxruntime.set_default_logger_severity(3)  # ORT's own fallback chatter; provider checks report it clearly

    items = expand_paths(paths)
    started = time.perf_counter()
    regular = output is not None and (not output.exists() or output.is_file())
    with locked(output, what="being written") if regular else contextlib.nullcontext():
        if output is not None:
            refuse_output_over_inputs(output, build_dir, paths, items)
        sink = Output(output, fmt, force)  # checked writable before minutes of loading, not after
        try:
            with locked(build_dir, shared=True, what="being rebuilt"), _warnings_as_lines():
                runtime = MassRuntime.load(build_dir, providers=providers, strict_providers=strict_providers,
                                           cache_size=cache_size, threads=threads)
            runtime.max_pixels = int(max_megapixels * 1e6)
            sink.start()
        except BaseException:
            sink.abandon()
            raise
        summary = classify_all(runtime, items, sink, batch_size, top_k, progress)
        sink.close()
    summary.update(load_seconds=round(summary.pop("started") - started, 3), build=str(build_dir),
                   output=str(output) if output else None, format=fmt)
    report(summary, as_json)
    sys.exit(exit_status(summary))


def classify_all(runtime, items, sink: Output, batch_size: int, top_k: int, progress) -> dict:
    from tqdm import tqdm

    counts, failed, warned, done = Counter(), 0, 0, 0
    interrupted, output_error = False, None
    bar = tqdm(total=len(items), unit="img", file=sys.stderr, disable=(not progress) if progress is not None
               else None, desc="classifying")
    run_started = time.perf_counter()
    try:
        for batch in runtime.classify_batches(items, batch_size, top_k):
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
            "per_task": {t: counts[t] for t in runtime.tasks}, "providers": runtime.providers["encoder"],
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
