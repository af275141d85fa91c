"""The README's promises that CI and newcomers rely on."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if line.startswith("python3 -m venv"))
    assert command in readme


def test_readme_first_screen_has_exactly_two_setup_commands():
    first_screen = (ROOT / "README.md").read_text().split("## What a cache looks like")[0]
    commands = [line for line in first_screen.splitlines() if line.startswith("python3 -m venv")]
    assert len(commands) == 2 and any("kdcache demo" in c for c in commands)
