"""The package layout holds: no import cycles between packages, model code imports nothing
of training, and every console script's main lives in modxla/cli/."""

import ast
import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "modxla"


def package_of(module: str) -> str:
    """modxla.train.optim -> train; modxla.config -> config (a top-level module)."""
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """package -> the other modxla packages its modules import (function-level imports too)."""
    deps: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mine = parts[1] if len(parts) > 1 else "__init__"
        if path.name == "__main__.py":  # python -m modxla.train: an entry point, like cli/
            mine = "cli"
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "modxla":  # from modxla import rundir
                    names = [f"modxla.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("modxla.") and package_of(name) != mine:
                    deps.setdefault(mine, set()).add(package_of(name))
    return deps


def test_packages_form_no_import_cycle():
    deps = imports()
    state: dict[str, str] = {}

    def visit(pkg: str, path: list[str]) -> None:
        if state.get(pkg) == "done":
            return
        assert state.get(pkg) != "open", f"import cycle: {' -> '.join([*path, pkg])}"
        state[pkg] = "open"
        for dep in sorted(deps.get(pkg, ())):
            visit(dep, [*path, pkg])
        state[pkg] = "done"

    for pkg in sorted(deps):
        visit(pkg, [])
    assert {"model", "train", "io", "xla", "cli"} <= set(deps)  # the walk saw the packages


def test_model_code_imports_nothing_of_training():
    assert imports()["model"] <= {"config", "errors"}


def test_every_console_script_main_is_in_cli():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    scripts = [tuple(part.strip() for part in line.split("=", 1)) for line in lines]
    assert len(scripts) >= 10
    for name, target in scripts:
        module, func = target.split(":")
        assert module.startswith("modxla.cli."), f"{name}: {target} is not in modxla/cli/"
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        assert f"def {func}(" in source, f"{name}: no {func} in {module}"
    # and cli/ holds commands only: every module there is some script's target
    targets = {t.split(":")[0] for _, t in scripts}
    helpers = {"modxla.cli.common"}
    for path in (PKG / "cli").glob("*.py"):
        if path.stem != "__init__":
            assert f"modxla.cli.{path.stem}" in targets | helpers, f"{path}: no console script"
