"""The `mass-export` command: a thin layer over the library. Torch is imported only by commands that need it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mass_export.core.errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE,
                                     MassExportError)
from mass_export.core.jsonout import strict_dumps

# Optional dependencies by top-level module, and the extra that brings them (pyproject.toml).
EXTRAS = {"torch": "build", "torchvision": "build", "open_clip": "build", "onnx": "build", "onnxscript": "build",
          "skimage": "build", "sklearn": "zoo", "tensorrt": "tensorrt"}


def debugging(ctx) -> bool:
    return bool((ctx.obj or {}).get("debug")) or os.environ.get("MASS_EXPORT_DEBUG", "") not in ("", "0")


def _quiet_broken_pipe() -> None:
    """stdout's reader is gone: point stdout at /dev/null so Python's exit flush does not print a second error."""
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), sys.stdout.fileno())


class Group(click.Group):
    """Turns every failure into one line and its own exit code (mass_export/core/errors.py lists them)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MassExportError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(error.exit_code)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except BrokenPipeError:
            try:
                _quiet_broken_pipe()
            except (OSError, ValueError, AttributeError):  # CliRunner's stdout has no real file
                pass
            sys.exit(EXIT_BROKEN_PIPE)
        except ModuleNotFoundError as error:
            extra = EXTRAS.get((error.name or "").split(".")[0])
            if extra is None or debugging(ctx):
                raise
            command = ctx.invoked_subcommand or "this command"
            click.echo(f"error: `mass-export {command}` needs the [{extra}] extra: pip install "
                       f"'mass-export[{extra}]' (missing module {error.name})", err=True)
            sys.exit(EXIT_USAGE)
        except Exception as error:  # a bug: one line, the traceback on request
            if debugging(ctx):
                raise
            first = (str(error).strip().splitlines() or [""])[0]
            click.echo(f"error: internal error ({type(error).__name__}: {first}); rerun with --debug or "
                       "MASS_EXPORT_DEBUG=1 for the traceback, and please report it", err=True)
            sys.exit(EXIT_INTERNAL)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="mass-export")
@click.option("--debug", is_flag=True, help="Show the Python traceback of an internal error (also: "
              "MASS_EXPORT_DEBUG=1).")
@click.pass_context
def main(ctx, debug):
    """Build, export and serve MASS (MoErging through Adaptive Subspace Selection) for open_clip encoders.

    \b
    Exit status (every command): 0 success; 1 some images failed (run); 2 bad input or refused output;
    3 build missing or changed; 4 validation failed; 5 provider refused; 6 no image classified (run);
    7 output write failed; 70 internal error; 75 busy (another process holds the build or output);
    130 interrupted; 141 stdout closed by its reader.
    """
    ctx.ensure_object(dict)["debug"] = debug


def _echo_json(data, what: str = "JSON output") -> None:
    click.echo(strict_dumps(data, what, indent=2, default=str))


@main.command()
@click.option("--model", required=True, help="open_clip model name (ViT-B-16), hf-hub:ORG/REPO, local-dir:PATH, "
              "or a path to an open_clip model-config JSON.")
@click.option("--pretrained", default=None, help="open_clip pretrained tag (openai) or a checkpoint file. "
              "Default: zeroshot.pt / zeroshot.safetensors found under --checkpoints.")
@click.option("--checkpoints", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Directory with one fine-tuned checkpoint per task (task_vectors layout: TASK/finetuned.pt, "
              "TASKVal/nonlinear_finetuned.pt, TASK/finetuned.safetensors, TASK/pytorch_model.bin).")
@click.option("--tasks", default=None, help="A count (8, 14, 20: the benchmark lists in models/benchmarks.json) "
              "or comma-separated task names. Default: every task found under --checkpoints.")
@click.option("--rank", type=int, default=None, help="Components kept per task and matrix. "
              "Default: floor(min(m, n) / T).")
@click.option("--routing-layer", type=int, default=None, help="Block whose c_fc input feeds the router. "
              "Default: from models/architectures.json (ViT-B-16: 9, ViT-L-14: 20), else 3/4 of the depth.")
@click.option("--base", type=click.Choice(["no-redundancy", "tsv"]), default="no-redundancy",
              help="First-pass model theta_MT: TSV-M skipping redundant tasks (cosine > --redundancy-threshold) "
              "or plain TSV-M of all tasks.")
@click.option("--redundancy-threshold", type=float, default=0.3)
@click.option("--split-qkv/--fused-qkv", default=True, help="Truncate attention q, k, v separately "
              "(the authors' later code) or the fused in_proj_weight.")
@click.option("--alpha", type=float, default=1.0, help="Scale of the merged task update.")
@click.option("--eta", type=float, default=0.2, help="Router probability threshold for selecting a task.")
@click.option("--top-k", type=int, default=3, help="At most this many tasks per image.")
@click.option("--tau", type=float, default=1.0, help="Router softmax temperature.")
@click.option("--router-on", type=click.Choice(["merged", "pretrained"]), default="merged",
              help="Route on theta_MT (the paper) or on theta_pre (the authors' ablation).")
@click.option("--quick-gelu/--no-quick-gelu", default=None, help="State the activation; a contradiction "
              "with what the weights say is refused. Default: detected (openai tags use QuickGELU).")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=Path("build"), help="Build directory.")
@click.option("--force", is_flag=True, help="Overwrite an existing output directory.")
@click.option("--export/--no-export", default=True, help="Export ONNX graphs (and validate them).")
@click.option("--validate/--no-validate", default=True, help="Check the graphs against the torch reference.")
@click.option("--atol", type=float, default=1e-4, help="Validation tolerance on features and logits.")
@click.option("--opset", type=int, default=18)
@click.option("--threads", type=int, default=None, help="torch threads for the SVDs, export and validation "
              "(default: torch's). On a busy 2-core machine 1 is several times faster than 2.")
@click.option("--storage-dtype", type=click.Choice(["fp32", "fp16"]), default="fp32",
              help="Precision of the stored per-task factors and deltas (theta_pre stays fp32). fp16 halves them; "
              "see the README for its measured accuracy effect.")
@click.option("--validation-images", type=click.Path(exists=True, path_type=Path), multiple=True,
              help="Images for validation (default: scikit-image's sample photos).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def build(as_json, validation_images, **options):
    """Merge and truncate task updates (MASS), export ONNX graphs, validate them, write a build directory."""
    from mass_export.pipeline.build import BuildConfig, build as run_build

    images = []
    for path in validation_images:
        images += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    output, manifest = run_build(BuildConfig(validation_images=images, **options))
    if as_json:
        _echo_json(manifest)
        return
    storage = manifest["storage"]
    click.echo(f"wrote {output}: {len(manifest['tasks'])} tasks, routing layer {manifest['method']['routing_layer']}, "
               f"ranks {manifest['method']['ranks']}, {storage['total_bytes'] / 2**20:.1f} MiB "
               f"({storage['factor_of_tower']['total']:.2f}x the fp32 tower)")
    if "validation" in manifest:
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in manifest["validation"]["max_abs_diff"].items())
        click.echo(f"validation passed (atol {manifest['validation']['atol']}): max |diff| {diffs}")


@main.command()
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--atol", type=float, default=1e-4)
@click.option("--images", "image_paths", type=click.Path(exists=True, path_type=Path), multiple=True,
              help="Images to validate on (default: scikit-image's sample photos).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON to this file (outside the build: the build is never rewritten).")
@click.option("--json", "as_json", is_flag=True)
def validate(build_dir, atol, image_paths, report_path, as_json):
    """Re-run the ONNX graphs against the torch reference rebuilt from the build's stored parts.

    Read-only: the build directory is not modified (its manifest keeps the build-time validation)."""
    from mass_export.core.errors import OutputRefused
    from mass_export.core.outputs import is_within, locked
    from mass_export.export.validate import validate_build
    from mass_export.merging.stored import reference_from_build

    if report_path is not None and is_within(report_path.resolve(), build_dir.resolve()):
        raise OutputRefused(f"--report {report_path}: inside the build directory {build_dir}, which validate never "
                            "modifies; choose a path outside it")
    images = []
    for path in image_paths:
        images += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    with locked(build_dir, shared=True, what="being rebuilt"):
        report = validate_build(build_dir, reference_from_build(build_dir), atol=atol, images=images)
    if report_path is not None:
        report_path.write_text(strict_dumps(report, str(report_path), indent=2) + "\n")
    if as_json:
        _echo_json(report)
    else:
        for name, value in report["max_abs_diff"].items():
            click.echo(f"{name:<11} max|diff| {value:.3e}")
        click.echo(f"passed: task sets identical, predictions identical, all within atol {atol}")


@main.command()
@click.argument("build_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--memory", is_flag=True, help="Also measure the runtime's peak resident memory (loads the build "
              "and classifies a batch of 16 in a fresh process); printed, not stored in the build.")
@click.option("--json", "as_json", is_flag=True)
def inspect(build_dir, memory, as_json):
    """Show a build: model, tasks, method, storage per part, validation. Read-only."""
    from mass_export.core.manifest import read_manifest

    manifest = read_manifest(build_dir)
    if memory:
        from mass_export.evaluation.bench import runtime_memory

        manifest = {**manifest, "runtime_memory": runtime_memory(build_dir)}
    if as_json:
        _echo_json({k: manifest.get(k) for k in ("model", "tasks", "method", "heads", "storage", "validation",
                                                  "runtime_memory")})
        return
    model, method, storage = manifest["model"], manifest["method"], manifest["storage"]
    click.echo(f"model      {model['name']} ({model['pretrained']}), quick_gelu={model['quick_gelu']}, "
               f"{model['image_size']} px")
    click.echo(f"tasks      {', '.join(manifest['tasks'])}")
    click.echo(f"method     base={method['base']} routing_layer={method['routing_layer']} eta={method['eta']} "
               f"top_k={method['top_k']} tau={method['tau']} alpha={method['alpha']} ranks={method['ranks']}")
    click.echo("storage    part              MiB    x fp32 tower")
    for part, size in {**storage["bytes"], "total": storage["total_bytes"]}.items():
        click.echo(f"           {part:<16}{size / 2**20:>7.1f}    {storage['factor_of_tower'][part]:.3f}")
    if manifest.get("runtime_memory"):
        rm = manifest["runtime_memory"]
        click.echo(f"runtime    peak RSS {rm['peak_rss_mib']:.0f} MiB (load + one batch of {rm['batch']}), "
                   f"load {rm['load_seconds']} s")
    if manifest.get("validation"):
        click.echo(f"validation passed={manifest['validation']['passed']} "
                   f"max|diff|={max(manifest['validation']['max_abs_diff'].values()):.2e}")


# Each command module imports its heavy dependencies (torch, onnx) only when the command runs.
from .bench_cmd import bench  # noqa: E402
from .demo_cmd import demo  # noqa: E402
from .eval_cmd import eval_command  # noqa: E402
from .run_cmd import run  # noqa: E402
from .zoo_cmd import zoo  # noqa: E402

for command in (run, demo, zoo, eval_command, bench):
    main.add_command(command)
