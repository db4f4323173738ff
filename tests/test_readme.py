"""The README's commands: every one it names answers --help, every console script is listed,
and the CPU quick start runs as written."""

import configparser
import importlib
import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()
QUICK_START = "Quick start (CPU)"

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
COMMENT = re.compile(r"(?:^|[ \t])#.*$", re.M)
# A command starts a line (after an optional `$ ` prompt) or follows && || ; | ( , and may be
# preceded by environment assignments such as PJRT_DEVICE=CPU.
START = r"(?:^|&&|\|\||[;|(])[ \t]*(?:\$[ \t]+)?(?:[A-Za-z_]\w*=\S*[ \t]+)*"
SCRIPT = re.compile(START + r"(modxla-[a-z][a-z-]*)", re.M)
TOOL = re.compile(r"\bpython3?[ \t]+(tools/\w+\.py)\b")
MODULE = re.compile(r"\bpython3?[ \t]+-m[ \t]+(modxla(?:\.\w+)*)")


def code() -> str:
    """The README's fenced code blocks, without shell comments (they name commands in prose)."""
    return "\n".join(COMMENT.sub("", block) for block in FENCE.findall(README))


def console_scripts() -> dict[str, str]:
    """name -> module of every console script setup.cfg declares."""
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(ROOT / "setup.cfg")
    scripts = {}
    for line in cfg["options.entry_points"]["console_scripts"].splitlines():
        if line.strip():
            name, target = (part.strip() for part in line.split("=", 1))
            scripts[name] = target.split(":")[0]
    return scripts


def readme_commands() -> list[tuple[str, list[str] | None]]:
    """(the README's spelling, argv after the interpreter) of every command in its code; argv
    is None for a console script setup.cfg does not declare (it would not be installed)."""
    text = code()
    scripts = console_scripts()
    found = []
    for name in sorted(set(SCRIPT.findall(text))):
        found.append((name, ["-m", scripts[name]] if name in scripts else None))
    found += [(tool, [tool]) for tool in sorted(set(TOOL.findall(text)))]
    found += [(f"-m {mod}", ["-m", mod]) for mod in sorted(set(MODULE.findall(text)))]
    return found


COMMANDS = readme_commands()


def command_env() -> dict[str, str]:
    # the test's interpreter is the environment: its bin first, so console scripts are its own
    bin_dir = os.path.dirname(sys.executable)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PJRT_DEVICE": "CPU", "CPU_NUM_DEVICES": "8", "PATH": path}


def quick_start() -> str:
    heading = re.search(rf"^#+ {re.escape(QUICK_START)}[ \t]*$", README, re.M)
    assert heading, f"README has no '{QUICK_START}' heading"
    block = FENCE.search(README, heading.end())
    assert block, f"no code block under '{QUICK_START}'"
    return block.group(1)


def test_readme_names_console_scripts_and_tools():
    names = {name for name, _ in COMMANDS}
    missing = sorted(set(console_scripts()) - names)
    assert not missing, f"console scripts in setup.cfg but not in README's commands: {missing}"
    # the benchmarks and profilers exist only as tools/: README must list each of them
    tools = {f"tools/{p.name}" for p in (ROOT / "tools").glob("*.py")}
    measuring = {t for t in tools if t.startswith(("tools/bench_", "tools/profile_"))}
    assert measuring, "no benchmark or profiler found in tools/"
    assert not measuring - names, f"not in README: {sorted(measuring - names)}"


@pytest.mark.parametrize("name, argv", COMMANDS, ids=[name for name, _ in COMMANDS])
def test_every_readme_command_answers_help(name, argv, capsys):
    """In process (an interpreter start per command would cost the fast suite ~50 s): the
    main that the console script or the tools/ file runs, with --help. The quick start below
    runs installed console scripts for real."""
    assert argv is not None, f"README names {name}, which setup.cfg does not declare"
    module = argv[1] if argv[0] == "-m" else argv[0].removesuffix(".py").replace("/", ".")
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_quick_start_sets_up_the_shell_and_stays_small():
    lines = [line.strip() for line in quick_start().splitlines()]
    assert ". .venv/bin/activate" in lines
    exports = " ".join(line for line in lines if line.startswith("export "))
    assert "PJRT_DEVICE=CPU" in exports and "CPU_NUM_DEVICES=" in exports
    steps = re.findall(r"\btrain\.steps=(\d+)", quick_start())
    assert steps and int(steps[0]) <= 50, "the quick start trains only a few steps"
    run_dirs = re.findall(r"--run-dir[ \t]+(\S+)", quick_start())
    assert run_dirs and all(d.startswith("runs/") for d in run_dirs), run_dirs


@pytest.mark.slow
def test_quick_start_runs_as_written(tmp_path):
    block = quick_start()
    # The test's interpreter is already the environment (whichever VENV made it), and
    # command_env() puts its bin first: `make venv` and activating .venv would switch away.
    setup = (". ", "source ", "make ")
    script = "\n".join(line for line in block.splitlines() if not line.startswith(setup))
    # The only change: run directories go under tmp_path instead of the checkout's runs/.
    # The data cache is the default one (~/.cache/modxla), as for a user.
    script = script.replace("runs/", f"{tmp_path}/")
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=ROOT,
        env=command_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-4000:]}"

    run = tmp_path / re.search(r"--run-dir[ \t]+runs/(\S+)", block).group(1)
    steps = int(re.search(r"\btrain\.steps=(\d+)", block).group(1))
    assert (run / "config.yaml").is_file() and (run / "tokenizer.model").is_file()
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in logged) == steps
    saved = [int(p.parent.name.split("_")[1]) for p in run.glob("checkpoints/step_*/COMPLETE")]
    assert saved and max(saved) == steps
    evaluated = json.loads((run / "predictor" / "eval.json").read_text())
    for mode in ("topk", "predictor", "router"):
        assert math.isfinite(evaluated[mode]["nll"]), (mode, evaluated[mode])
    # modxla-generate: the sample (prompt included) on stdout, its speed on stderr
    prompt = re.search(r'--prompt[ \t]+"([^"]*)"', block).group(1)
    sampled = re.search(r"routing=predictor, (\d+) tokens in", proc.stderr)
    assert sampled and int(sampled.group(1)) >= 1, proc.stderr[-2000:]
    assert prompt.strip() in proc.stdout, proc.stdout[-2000:]
