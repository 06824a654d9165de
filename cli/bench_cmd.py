"""`mass-export bench`."""

from pathlib import Path

import click

from mass_export.core.jsonout import strict_dumps
from mass_export.evaluation import BENCH_BATCH_SIZES, BENCH_ITERATIONS, BENCH_SEED, BENCH_STREAMS, BENCH_WARMUP


@click.command()
@click.option("--build", "build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Build directory. Default: the demo zoo's build (made if missing).")
@click.option("--batch-sizes", default=",".join(map(str, BENCH_BATCH_SIZES)), show_default=True,
              help="Comma-separated batch sizes.")
@click.option("--warmup", type=int, default=BENCH_WARMUP, show_default=True, help="Untimed rounds per batch size.")
@click.option("--iterations", type=int, default=BENCH_ITERATIONS, show_default=True,
              help="Timed rounds per batch size.")
@click.option("--providers", default="cpu", help="cpu, cuda, tensorrt (comma-separated, in preference order).")
@click.option("--threads", type=int, default=None, help="Intra-op threads (ONNX Runtime and torch).")
@click.option("--torch/--no-torch", "with_torch", default=True, help="Also time the torch reference two-pass "
              "(naive, and early exit with cached task-set weights).")
@click.option("--peak-tflops", type=float, default=None, help="Device peak for model FLOPs utilisation "
              "(default: from a table of known GPUs).")
@click.option("--stream", "streams", default=",".join(BENCH_STREAMS), show_default=True,
              help="Comma list of streams: homogeneous (the same photos every batch, routed), mixed (task sets "
              "drawn per image: own task uniform, 1/2/3 tasks with p 0.28/0.63/0.09, partners uniform; seeded), "
              "or a folder / image file list (real images in order, routed).")
@click.option("--window", type=click.IntRange(min=1), default=None,
              help="Images per round, routed and then grouped by task set across the round as `run --window` does "
              "(rounded down to whole batches; default: run's default of 8 batches; equal to the batch size: batch "
              "by batch).")
@click.option("--seed", type=int, default=BENCH_SEED, show_default=True, help="Seed of the mixed stream's draws.")
@click.option("--cache-bytes", type=click.IntRange(min=0), default=None,
              help="Task-set cache budget of each runtime (default: from available memory).")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the result rows as CSV.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the JSON report to this file.")
def bench(build_dir, batch_sizes, warmup, iterations, providers, threads, with_torch, peak_tflops, streams, seed,
          window, cache_bytes, as_json, csv_path, output):
    """Time one plain encoder pass and the exported two-pass MASS runtime on each stream (the homogeneous one
    also per stage, preparing one task set, and the torch reference), interleaved round by round; report
    images/s, p50/p90/p99 latency, ratios to the plain pass, task sets per batch and cache counters. Each stream
    starts from a freshly loaded runtime: the warm-up rounds are reported as ``cold``, the timed ones as
    ``steady``."""
    from mass_export.evaluation.bench import run_bench, to_csv, to_table, write_report

    if build_dir is None:
        from mass_export.zoo.demo import default_build

        build_dir = default_build()
    report = run_bench(build_dir, [int(b) for b in batch_sizes.split(",")], warmup, iterations,
                       [p.strip() for p in providers.split(",")], threads, with_torch, peak_tflops,
                       progress=not as_json, streams=[s.strip() for s in streams.split(",") if s.strip()], seed=seed,
                       cache_bytes=cache_bytes, window=window)
    if output:
        write_report(report, output)
    if csv_path:
        csv_path.write_text(to_csv(report))
    click.echo(strict_dumps(report, "bench report", indent=2) if as_json else to_table(report))
