"""The README stays true to the code and to CI."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlecli.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


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


@pytest.mark.parametrize("name", ["download", "train", "evaluate", "plot", "runs"])
def test_every_option_of_a_command_is_in_the_readme(name):
    for param in main.commands[name].params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in README, f"{name} {opt} is missing from the README"


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
    for doc in (ROOT / "docs").glob("*.md"):
        text = doc.read_text()
        if "## Behaviour" not in text:
            continue
        section = text.split("## Behaviour", 1)[1].split("\n## ", 1)[0]
        named = set(re.findall(r"`(test_\w+)`", section))
        assert named, f"{doc.name}: its Behaviour table names no test"
        assert named <= defined, f"{doc.name} names tests that do not exist: {sorted(named - defined)}"


def test_training_md_documents_every_training_key():
    from mlecli.config import SCHEMA

    text = (ROOT / "docs" / "training.md").read_text()
    new = ["optimizer", "momentum", "beta1", "beta2", "epsilon", "prior_sd", "prior_biases", "schedule",
           "warmup_epochs", "decay_every", "decay_factor", "min_learning_rate", "plateau_patience",
           "plateau_factor", "patience", "shift"]
    assert set(new) <= set(SCHEMA["train"])
    for key in new:
        assert f"`{key}`" in text, key
