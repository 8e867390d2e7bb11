"""What code and which packages produced a run: the git commit of this checkout and the library versions."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "transformers", "accelerate", "numpy")
UNKNOWN = "unknown"


def code_commit(where: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``where`` (default: this package's source), with
    ``+uncommitted`` when tracked files differ from it; "unknown" outside a git checkout or without git."""
    where = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10)
        if head.returncode != 0 or not head.stdout.strip():
            return UNKNOWN
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return UNKNOWN
    return head.stdout.strip() + ("+uncommitted" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def package_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """{package: installed version}, "not installed" for one that is absent."""
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def provenance() -> dict[str, Any]:
    """{"commit", "versions"} of the running code, as recorded beside each run of a study."""
    return {"commit": code_commit(), "versions": package_versions()}


def provenance_lines(meta: dict[str, Any]) -> str:
    """The code commit and package versions each run was made with (study.json's ``runs``), grouped when they agree."""
    runs = meta.get("runs") or {}
    if not runs:
        return ("\nCode commit and package versions: not recorded (this study.json predates `itermerge replicate` "
                "recording them).")
    by_commit: dict[str, list[str]] = {}
    by_versions: dict[str, list[str]] = {}
    for name, entries in runs.items():
        for e in entries:
            by_commit.setdefault(e.get("commit", "unknown"), []).append(name)
            versions = ", ".join(f"{k} {v}" for k, v in (e.get("versions") or {}).items()) or "unknown"
            by_versions.setdefault(versions, []).append(name)

    def grouped(groups: dict[str, list[str]]) -> str:
        if len(groups) == 1:
            return f"{next(iter(groups))} (all {len(runs)} runs)"
        return "; ".join(f"{k} ({', '.join(sorted(set(v)))})" for k, v in groups.items())

    return f"\nCode commit: {grouped(by_commit)}. Packages: {grouped(by_versions)}."
