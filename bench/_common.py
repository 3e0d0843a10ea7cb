"""What every benchmark script here writes the same way: library versions and the result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable


def package_versions(packages: Iterable[str]) -> dict[str, str | None]:
    """Installed versions (None for a package that is not installed)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def save_result(result: dict[str, Any], out: str | Path | None, md: str | None = None) -> None:
    """``result`` as JSON at ``out`` (folders made), and the Markdown summary beside it (``.md``)."""
    if not out:
        return
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    if md is not None:
        path.with_suffix(".md").write_text(md)
