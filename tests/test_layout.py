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


def test_architecture_doc_matches_the_imports_and_the_tree():
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = {}
    for line in doc.split("| package | imports from |")[1].split("\n\n")[0].splitlines()[2:]:
        pkg, deps = (cell.strip() for cell in line.strip("|").split("|"))
        table[pkg.strip("`")] = {d.strip().strip("`") for d in deps.split(",")}
    assert table == imports()
    tree = doc.split("```")[1]  # the layout block
    for pkg in (p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        if pkg.name == "cli":  # listed by what it holds, not file by file
            continue
        row = next(line for line in tree.splitlines() if line.strip().startswith(f"{pkg.name}/"))
        listed = set(row.split()[1:])
        files = {p.name for p in pkg.glob("*.py")} - {"__init__.py"}
        assert listed == files, f"docs/architecture.md lists {pkg.name}/ as {sorted(listed)}"
