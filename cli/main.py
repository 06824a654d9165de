"""The `mass-export` command: a thin layer over the library. Torch is imported only by commands that need it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from mass_export.core.errors import (EXIT_BROKEN_PIPE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE,
                                     MassExportError)
from mass_export.core.jsonout import strict_dumps
from mass_export.core.options import OPTIONS

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


def image_files(paths, option: str) -> list[Path]:
    """The image files PATHS name (folders searched as `run` searches them); a path naming none is refused."""
    from mass_export.runtime.images import PathProblem, expand_paths

    found = expand_paths(paths)
    problems = [f"{item.path}: {item.error}" for item in found if isinstance(item, PathProblem)]
    if problems:
        raise click.BadParameter("; ".join(problems), param_hint=option)
    return found


def _click_option(option):
    """A click option for one mass_export.core.options.Option. Defaults stay None here, so that only options
    given on the command line override a --config file; the help shows the real default."""
    decls = [option.flag + (f"/--{option.off}" if option.off else "")]
    if option.short:
        decls.insert(0, option.short)
    shown = option.default
    if option.kind is bool and option.off and option.default is not None:
        shown = option.flag if option.default else f"--{option.off}"
    shown_default = shown not in (None, (), [], False)
    kwargs = {"default": None, "show_default": False,
              "help": option.help + (f"  [default: {shown}]" if shown_default else "")}
    if option.kind is bool and not option.off:
        kwargs.update(is_flag=True)
    elif option.kind == "path":
        kwargs["type"] = click.Path(path_type=Path, exists=option.name == "checkpoints",
                                    file_okay=option.name != "checkpoints")
    elif option.kind == "paths":
        kwargs.update(type=click.Path(exists=True, path_type=Path), multiple=True)
    elif option.choices:
        kwargs["type"] = click.Choice(option.choices)
    elif option.kind in (int, float):
        kwargs["type"] = option.kind
    return click.option(*decls, option.name, **kwargs)


def _deprecated_option(option, old: str):
    """A hidden option for an old spelling; the command warns and uses its value."""
    return click.option("--" + old.replace("_", "-"), f"{option.name}__{old}", type=option.kind, default=None,
                        hidden=True)


def build_options(function):
    """The build command's options, generated from BuildConfig's fields (each carries its Option)."""
    from mass_export.core.options import options_of
    from mass_export.pipeline.config import BuildConfig  # stdlib + core only: the CLI starts fast

    for option in reversed([o for o in options_of(BuildConfig) if o.in_cli]):
        for old in option.deprecated:
            function = _deprecated_option(option, old)(function)
        function = _click_option(option)(function)
    return function


def take_deprecated(values: dict) -> dict:
    """Move hidden old-spelling options onto their option, with a warning; drop those not given."""
    out = {}
    for key, value in values.items():
        if "__" not in key:
            out.setdefault(key, value)
            continue
        name, old = key.split("__", 1)
        if value is not None:
            new = OPTIONS[name].flag
            click.echo(f"warning: --{old.replace('_', '-')} is deprecated, use {new}", err=True)
            if out.get(name) is None:
                out[name] = value
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None):
    click.echo(f"warning: {message}", err=True)


@main.command()
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="A build config file (YAML or JSON): model, pretrained, tasks with their checkpoint, head, classes "
              "and templates, and any option below by name (docs/checkpoints.md). Options given here override it.")
@build_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def build(as_json, config_file, **given):
    """Merge and truncate task updates (MASS), export ONNX graphs, validate them, write a build directory."""
    import warnings

    from mass_export.pipeline.build import BuildWarning, build as run_build
    from mass_export.pipeline.config import resolve

    given = take_deprecated(given)
    images = image_files(given.pop("validation_images", None) or (), "--validation-images")
    if images:
        given["validation_images"] = images
    with warnings.catch_warnings():
        warnings.simplefilter("always", BuildWarning)
        warnings.simplefilter("always", FutureWarning)
        warnings.showwarning = _show_warning
        output, manifest = run_build(resolve(given, config_file))
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
@click.option("--atol", type=float, default=OPTIONS["atol"].default, help=OPTIONS["atol"].help)
@click.option("--images", "image_paths", type=click.Path(exists=True, path_type=Path), multiple=True,
              help="Images to validate on (default: scikit-image's sample photos).")
@click.option("--report", "report_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the report as JSON to this file (outside the build: the build is never rewritten).")
@click.option("--json", "as_json", is_flag=True)
def validate(build_dir, atol, image_paths, report_path, as_json):
    """Re-run the ONNX graphs against the torch reference rebuilt from the build's stored parts.

    Read-only: the build directory is not modified (its manifest keeps the build-time validation)."""
    OPTIONS["atol"].validate(atol)
    from mass_export.core.errors import OutputRefused
    from mass_export.core.outputs import is_within, locked
    from mass_export.export.validate import validate_build
    from mass_export.merging.stored import reference_from_build

    if report_path is not None and is_within(report_path.resolve(), build_dir.resolve()):
        raise OutputRefused(f"--report {report_path}: inside the build directory {build_dir}, which validate never "
                            "modifies; choose a path outside it")
    images = image_files(image_paths, "--images")
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
