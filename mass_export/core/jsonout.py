"""JSON out: strict (no NaN/Infinity, which are not JSON), with the offending key named when it refuses."""

from __future__ import annotations

import json
import math

from mass_export.core.errors import MassExportError


def non_finite_keys(data, prefix: str = "") -> list[str]:
    """Dotted paths of every float NaN/Inf inside nested dicts and lists."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [prefix or "(value)"]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in non_finite_keys(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(data, (list, tuple)):
        return [p for i, v in enumerate(data) for p in non_finite_keys(v, f"{prefix}[{i}]")]
    return []


def strict_dumps(data, what: str, **options) -> str:
    """json.dumps that refuses NaN/Inf (``allow_nan=False``) with an error naming ``what`` and the keys."""
    try:
        return json.dumps(data, allow_nan=False, **options)
    except ValueError:
        bad = non_finite_keys(json.loads(json.dumps(data, default=options.get("default"))))
        raise MassExportError(f"{what}: refusing to write NaN/Inf (not JSON) at {', '.join(bad[:5]) or '?'}") from None
