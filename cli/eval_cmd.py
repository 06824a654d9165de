"""`mass-export eval`."""

from pathlib import Path

import click

from mass_export.core.jsonout import strict_dumps
from mass_export.evaluation import EVAL_BATCH_SIZE, EVAL_TA_LAMBDA


@click.command("eval")
@click.option("--build", "build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Build directory. Default: the demo zoo's build (made if missing).")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The fine-tuned checkpoints (for fine-tuned and task-arithmetic rows). Default with the demo "
              "zoo: its checkpoints.")
@click.option("--data", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Labelled images as DATA/<task>/<class>/*. Default: the demo zoo's held-out test splits.")
@click.option("--routing-layer-sweep", "sweep", default=None,
              help="Comma-separated routing layers to also score MASS with, or 'all'.")
@click.option("--runtime/--no-runtime", "with_runtime", default=True, help="Also score MASS through the "
              "exported ONNX runtime and report its agreement with the torch reference.")
@click.option("--ta-lambda", type=float, default=EVAL_TA_LAMBDA, show_default=True, help="Task-arithmetic scaling.")
@click.option("--limit", type=int, default=None, help="At most this many test images per task.")
@click.option("--batch-size", type=int, default=EVAL_BATCH_SIZE, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema mass-export/eval/1).")
def eval_command(build_dir, checkpoints, data, sweep, with_runtime, ta_lambda, limit, batch_size, as_json):
    """Accuracy per task and on average of zero-shot, fine-tuned, task arithmetic, TSV-M (plain and
    no-redundancy), TSV-C with the task known, and MASS (torch reference and ONNX runtime); normalised accuracy,
    router task identification and its confusion matrix. MASS counts only when task and class are both right;
    the authors' padded-logits metric is reported beside it."""
    from mass_export.evaluation.accuracy import evaluate, format_table
    from mass_export.core.manifest import read_manifest

    if build_dir is None:
        from mass_export.zoo.demo import default_build, zoo_root

        build_dir = default_build(progress=not as_json)
        checkpoints = checkpoints or zoo_root(build_dir)
    layers = None
    if sweep:
        depth = read_manifest(build_dir)["model"]["layers"]
        layers = list(range(depth)) if sweep == "all" else [int(x) for x in sweep.split(",")]
    report = evaluate(build_dir, checkpoints, data, layers, with_runtime, ta_lambda, limit, batch_size,
                      progress=not as_json)
    click.echo(strict_dumps(report, "eval report", indent=2) if as_json else format_table(report))
