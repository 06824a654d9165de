"""What the benchmark scripts here print and save: one strict JSON result (NaN is refused, never written)."""

from __future__ import annotations

from pathlib import Path

from mass_export.core.jsonout import strict_dumps


def report(result: dict, path: str | None) -> None:
    """Print ``result`` as JSON and, when ``path`` is given, write it there."""
    text = strict_dumps(result, "result", indent=1)
    print(text)
    if path:
        Path(path).write_text(text + "\n")
