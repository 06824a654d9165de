"""Typed errors shared by every room. Each carries the exit code the CLI returns for it.

Exit codes of the `mass-export` command (README, "Exit codes"; docs/reliability.md):

    0   success
    1   partial failure: some images could not be classified (`run`); the others were written
    2   bad input or a refused request: options, checkpoints, an existing or protected output
    3   the build directory is missing, not ours, or changed since it was built (names the file)
    4   validation failed: the graphs disagree with the torch reference (or produced NaN/Inf)
    5   a requested execution provider cannot run (--strict-providers)
    6   total failure: `run` classified no image at all
    7   the output could not be written (disk full, I/O error); rows written before are whole and kept
    70  internal error (a bug): one line; the traceback with --debug or MASS_EXPORT_DEBUG=1
    75  busy: another mass-export process holds the build or output; try again when it ends
    130 interrupted (Ctrl-C); rows written so far are kept
    141 the reader of stdout went away (broken pipe, e.g. `| head`): stops quietly
"""

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_BUILD, EXIT_VALIDATION, EXIT_PROVIDER = 0, 1, 2, 3, 4, 5
EXIT_TOTAL_FAILURE, EXIT_OUTPUT, EXIT_INTERNAL, EXIT_BUSY, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 6, 7, 70, 75, 130, 141


class MassExportError(Exception):
    """Base class: a problem the user can act on (bad input, refused build, failed validation)."""

    exit_code = EXIT_USAGE


class CheckpointError(MassExportError):
    """A checkpoint file cannot be read, is foreign, or does not match the pretrained model."""


class MissingCheckpoints(CheckpointError):
    def __init__(self, root, missing, searched: str = "", found=()):
        self.root, self.missing = root, list(missing)
        lines = [f"{root}: no checkpoint for task(s) {', '.join(self.missing)}"]
        if searched:
            lines.append(searched)
        if found:
            lines.append(f"tasks found there: {', '.join(found)} (choose with --tasks)")
        lines.append("name a task's checkpoint (file or folder) in a build config: --config tasks.yaml with "
                     "tasks: {NAME: {checkpoint: PATH}} (docs/checkpoints.md)")
        super().__init__("\n  ".join(lines))


class ConfigError(MassExportError):
    """An option or option combination that cannot work (e.g. a rank that rounds to 0)."""


class BuildExists(MassExportError):
    """The output directory exists and --force was not given."""


class OutputRefused(MassExportError):
    """An output that would overwrite an input, or something that is not ours to replace."""


class BuildIntegrityError(MassExportError):
    """A build directory whose files do not match its manifest (tampered, truncated or missing)."""

    exit_code = EXIT_BUILD


class ValidationError(MassExportError):
    """Exported graphs disagree with the torch reference beyond tolerance."""

    exit_code = EXIT_VALIDATION

    def __init__(self, message, table=None):
        self.table = table or []
        super().__init__(message)


class ProviderError(MassExportError):
    """A requested execution provider is not the one actually running (with --strict-providers)."""

    exit_code = EXIT_PROVIDER


class OutputWriteError(MassExportError):
    """Writing an output file failed part way (disk full, I/O error)."""

    exit_code = EXIT_OUTPUT


class Busy(MassExportError):
    """Another mass-export process holds the lock of this build or output."""

    exit_code = EXIT_BUSY
