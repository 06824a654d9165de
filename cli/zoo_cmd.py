"""`mass-export zoo`."""

from pathlib import Path

import click

from mass_export.core.jsonout import strict_dumps


@click.group()
def zoo():
    """The embedded demo zoo: a tiny CLIP trained here on real offline datasets, fine-tuned per task."""


@zoo.command("build")
@click.option("--recipe", default=None, help="Recipe JSON (default: models/zoo/default.json).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Default: $MASS_EXPORT_CACHE or ~/.cache/mass-export.")
@click.option("--json", "as_json", is_flag=True)
def build_zoo_command(recipe, cache_dir, as_json):
    """Build (or return the cached) zoo; prints its checkpoint directory."""
    from mass_export.zoo import build_zoo

    result = build_zoo(recipe, cache_dir=cache_dir, progress=not as_json)
    info = {"root": str(result.root), "model_config": str(result.model_config), "pretrained": str(result.pretrained),
            "tasks": list(result.tasks)}
    if as_json:
        click.echo(strict_dumps(info, "zoo info", indent=2))
    else:
        click.echo(f"zoo: {result.root}\n  tasks: {', '.join(result.tasks)}\n  next: mass-export build --model "
                   f"{result.model_config} --pretrained {result.pretrained} --checkpoints {result.root} -o build")
