"""`mass-export demo`."""

from pathlib import Path

import click

from mass_export.core.jsonout import strict_dumps


@click.command()
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              help="Where the test images and predictions go.")
@click.option("--images-per-task", type=int, default=50, help="Held-out test images written per task.")
@click.option("--batch-size", type=int, default=64)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def demo(out, images_per_task, batch_size, as_json):
    """Build (or reuse) the demo zoo and its MASS build, write real test images as PNG, classify them with the
    torch-free runtime, and show accuracy per task."""
    from mass_export.zoo.demo import run_demo

    report = run_demo(out, images_per_task, batch_size, progress=not as_json,
                      echo=(lambda *_: None) if as_json else click.echo)
    if as_json:
        click.echo(strict_dumps(report, "demo report", indent=2))
