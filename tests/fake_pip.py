"""What pip and uv check before they install, done offline: each requested distribution's
`Requires-Python` (from this venv's installed metadata of the same version) and the project's
`python_requires` against the target interpreter's version. Used by fake_python3.py."""

from __future__ import annotations

import configparser
import importlib.metadata as md
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent


def project_requirements(root: Path = ROOT) -> tuple[str, list[str]]:
    """(python_requires, install_requires) of setup.cfg."""
    cfg = configparser.ConfigParser()
    cfg.read(root / "setup.cfg")
    opts = cfg["options"]
    reqs = [r.strip() for r in opts["install_requires"].splitlines()]
    return opts["python_requires"], [r for r in reqs if r and not r.startswith("#")]


def requires_python(req: str) -> str | None:
    """Requires-Python of the pinned distribution `req`, or None if that version is not
    installed here (nothing to check offline)."""
    r = Requirement(req)
    try:
        dist = md.distribution(r.name)
    except md.PackageNotFoundError:
        return None
    if r.specifier and dist.version not in r.specifier:
        return None
    return dist.metadata.get("Requires-Python") or ""


def check(specs: list[str], python: str) -> list[str]:
    """The errors pip would print installing `specs` ('-e .' = the project) with `python`."""
    errors, reqs = [], [s for s in specs if s not in (".", "-e")]
    if "." in specs:
        needs, deps = project_requirements()
        if python not in SpecifierSet(needs):
            errors.append(
                f"ERROR: Package 'modxla' requires a different Python: {python} not in '{needs}'"
            )
        reqs += deps
    for req in reqs:
        needs = requires_python(req)
        if needs and python not in SpecifierSet(needs):
            errors.append(
                f"ERROR: Could not find a version that satisfies the requirement {req} "
                f"(Requires-Python {needs}; this is Python {python})"
            )
    return errors
