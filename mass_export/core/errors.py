"""Typed errors shared by every room. Each carries the exit code the CLI returns for it."""


class MassExportError(Exception):
    """Base class: a problem the user can act on (bad input, refused build, failed validation)."""

    exit_code = 2


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


class BuildIntegrityError(MassExportError):
    """A build directory whose files do not match its manifest (tampered, truncated or missing)."""

    exit_code = 3


class ValidationError(MassExportError):
    """Exported graphs disagree with the torch reference beyond tolerance."""

    exit_code = 4

    def __init__(self, message, table=None):
        self.table = table or []
        super().__init__(message)


class ProviderError(MassExportError):
    """A requested execution provider is not the one actually running (with --strict-providers)."""

    exit_code = 5
