"""The README stays true to the code and to CI."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlecli.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))}


def sh_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)\n```", README, re.S)


def test_readme_has_exactly_two_setup_commands():
    blocks = sh_blocks()
    assert len(blocks) == 2 and all("\n" not in b for b in blocks)
    install, tests = blocks
    assert install.startswith("python3 -m venv .venv && .venv/bin/pip install . && ")
    assert tests.endswith("python -m pytest -q")


def test_ci_runs_the_readme_test_command_verbatim():
    ci = (ROOT / ".ci" / "run").read_text()
    assert sh_blocks()[1] in ci.splitlines()


def test_every_command_has_help():
    for name, cmd in main.commands.items():
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0, name
        assert cmd.help and cmd.help.split("\n")[0] in res.output


@pytest.mark.parametrize("name", ["download", "train", "evaluate", "plot", "runs", "sweep"])
def test_every_option_of_a_command_is_in_the_readme(name):
    documented = README + "".join(DOCS.values())
    for param in main.commands[name].params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in documented, f"{name} {opt} is missing from the README and docs/"


def test_every_test_named_in_what_happens_when_exists():
    section = README.split("## What happens when", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(test_\w+)`", section))
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    assert len(named) >= 30
    assert named <= defined, f"named in the README but not defined: {sorted(named - defined)}"


def test_every_test_named_in_a_docs_behaviour_table_exists():
    defined = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        defined |= set(re.findall(r"^def (test_\w+)", path.read_text(), re.M))
    for name, text in DOCS.items():
        if "\n## Behaviour" not in text:
            continue
        section = text.split("\n## Behaviour", 1)[1].split("\n## ", 1)[0]
        named = set(re.findall(r"`(test_\w+)`", section))
        assert named, f"docs/{name}: its Behaviour table names no test"
        assert named <= defined, f"docs/{name} names tests that do not exist: {sorted(named - defined)}"
