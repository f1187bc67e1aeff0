"""The documents stay true to the code and to CI.

The README's two set-up commands are the ones CI runs; every command has help; every option
is in docs/reference.md; every `mlecli …` command line shown in a fenced block of the README
or docs/*.md names a real command and only options it has (parsed by click, never run);
every test a behaviour table names exists; the README stays a short guide; and nothing in the
project points outside the clone.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from mlecli.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_LIMIT = 12_000
# Written in two pieces so that this file does not name them itself.
OUTSIDE = ("../" + "shared", "/work/" + "shared")


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


def test_the_readme_is_a_guide_of_at_most_12000_characters():
    assert len(README) <= README_LIMIT, f"README.md has {len(README)} characters; move detail into docs/"


def test_every_command_has_help():
    for name, cmd in main.commands.items():
        res = CliRunner().invoke(main, [name, "--help"])
        assert res.exit_code == 0, name
        assert cmd.help and cmd.help.split("\n")[0] in res.output


@pytest.mark.parametrize("name", sorted(main.commands))
def test_every_option_of_a_command_is_in_the_reference(name):
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert f"`mlecli {name}`" in reference, f"mlecli {name} has no section in docs/reference.md"
    for param in main.commands[name].params:
        for opt in param.opts:
            if opt.startswith("--") and opt != "--help":
                assert opt in reference, f"{name} {opt} is missing from docs/reference.md"


# ---------------------------------------------------------------------------
# Command lines shown in the documents


FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SEPARATORS = {"&&", "||", "|", ";"}
HELP = ("-h", "--help")


def _is_mlecli(words: list[str]) -> int:
    """How many words name the program at the start of `words` (0: it is not mlecli)."""
    if words and (words[0] == "mlecli" or words[0].endswith("/mlecli")):
        return 1
    if len(words) >= 3 and re.fullmatch(r"(.*/)?python3?", words[0]) and words[1:3] == ["-m", "mlecli"]:
        return 3
    return 0


def command_lines(text: str) -> list[tuple[str, list[str] | None]]:
    """(line, arguments after the program) of each mlecli invocation in the fenced blocks of
    `text`; arguments None where the line does not split like a shell line. A line may go on
    after a trailing backslash; `$ ` starts a command in a console transcript; commands
    chained with &&, || , | or ; are each one invocation."""
    found = []
    for block in FENCE.findall(text):
        logical, pending = [], ""
        for line in block.split("\n"):
            pending = f"{pending} {line.strip()}" if pending else line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            logical.append(pending)
            pending = ""
        for line in logical:
            shown = line.strip().removeprefix("$ ")
            try:
                words = shlex.split(shown, comments=True)
            except ValueError:
                words = None
            segments, current = [], []
            for word in (words if words is not None else shown.split()):
                if word in SEPARATORS:
                    segments.append(current)
                    current = []
                else:
                    current.append(word)
            segments.append(current)
            for segment in segments:
                n = _is_mlecli(segment)
                if n:
                    found.append((line, segment[n:] if words is not None else None))
    return found


def check_command_line(args: list[str]) -> None:
    """Raise click.UsageError unless `mlecli ARGS` names a command and only its options.

    A synopsis (a word in [brackets]) has each option it shows checked by name; a concrete
    line is parsed by the command itself, with its types and checks, and never run."""
    if not args or all(a in (*HELP, "--version") for a in args):
        return
    name, rest = args[0], args[1:]
    cmd = main.commands.get(name)
    if cmd is None:
        raise click.UsageError(f"no such command {name!r} (commands: {', '.join(sorted(main.commands))})")
    if any(a.startswith("[") for a in rest) or any(a in HELP for a in rest):
        known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | set(HELP)
        for word in rest:
            opt = word.lstrip("[").rstrip(".").rstrip("]").split("=", 1)[0]
            if opt.startswith("-") and opt not in known:
                raise click.UsageError(f"mlecli {name} has no option {opt}")
        return
    parent = click.Context(main, info_name="mlecli", **main.context_settings)
    cmd.make_context(name, list(rest), parent=parent)


SHOWN = [(path, line, args) for path in [ROOT / "README.md", *DOCS]
         for line, args in command_lines(path.read_text(encoding="utf-8"))]


def test_the_documents_show_mlecli_command_lines():
    """The check below has something to check: the set-up command and the tour in the README."""
    assert sum(1 for path, _, _ in SHOWN if path.name == "README.md") >= 6
    assert {path.name for path, _, _ in SHOWN} >= {"README.md", "reference.md"}


@pytest.mark.parametrize(("path", "line", "args"), SHOWN,
                         ids=[f"{p.relative_to(ROOT)}: {line.strip()[:60]}" for p, line, _ in SHOWN])
def test_every_mlecli_command_line_shown_names_a_command_and_its_options(path, line, args):
    assert args is not None, f"{path.name}: does not split like a shell line: {line}"
    try:
        check_command_line(args)
    except click.UsageError as exc:
        pytest.fail(f"{path.relative_to(ROOT)}: {line.strip()}\n  {exc.format_message()}")


@pytest.mark.parametrize(("line", "wrong"), [
    ("mlecli trian default", "no such command"),
    ("$ mlecli train --epochs 3", "No such option"),
    ("mlecli evaluate runs/x --split holdout", "holdout"),
    ("mlecli download --mirror ftp://example.org/", "unsupported URL scheme"),
    ("mlecli train --set train.epochs", "expected KEY=VALUE"),
    ("mlecli runs [--sorted name]", "no option --sorted"),
    ("python3 -m venv .venv && .venv/bin/mlecli plot", "Missing parameter: run_dir"),
])
def test_the_command_line_check_refuses_what_is_wrong(line, wrong):
    [(_, args)] = command_lines(f"```\n{line}\n```\n")
    with pytest.raises(click.UsageError, match=re.escape(wrong)):
        check_command_line(args)


def test_output_and_prose_in_blocks_are_not_taken_for_command_lines():
    block = "```\nplot:     mlecli plot runs/tour\n  #1300   digit 8  y=0\nruns/x/*.png   mlecli plot's pictures\n```\n"
    assert command_lines(block) == []


# ---------------------------------------------------------------------------
# The tour's output is the tool's


@pytest.fixture
def tour(tiny_config, tmp_path, monkeypatch):
    """A run at runs/tour, as the README's tour makes it, in a fresh current folder."""
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data"
    res = CliRunner().invoke(main, ["train", str(tiny_config(train={"epochs": 1})), "--run-dir", "runs/tour",
                                    "--data-dir", str(data), "-q"])
    assert res.exit_code == 0, res.output
    return data


def readme_lines(start: str) -> list[str]:
    return [line for line in README.splitlines() if line.startswith(start)]


def test_evaluate_and_export_print_the_paths_as_the_readmes_tour_shows_them(tour):
    res = CliRunner().invoke(main, ["evaluate", "runs/tour", "--data-dir", str(tour)])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[-1] == "  report            runs/tour/eval-test-best.json"
    assert readme_lines("  report  ") == [res.stdout.splitlines()[-1]]
    res = CliRunner().invoke(main, ["export", "runs/tour", "--format", "html"])
    assert res.exit_code == 0, res.output
    wrote = res.stdout.splitlines()[0]
    assert wrote.startswith("wrote runs/tour/best.html (") and wrote.endswith(" KB)")
    assert [line.split(" (")[0] for line in readme_lines("wrote ")] == ["wrote runs/tour/best.html"]


def test_a_path_typed_absolute_is_printed_absolute(tour, tmp_path):
    run = tmp_path / "runs" / "tour"
    res = CliRunner().invoke(main, ["evaluate", str(run), "--data-dir", str(tour)])
    assert res.stdout.splitlines()[-1] == f"  report            {run / 'eval-test-best.json'}"
    res = CliRunner().invoke(main, ["export", "runs/tour", "--format", "onnx", "--out", str(tmp_path / "n.onnx")])
    assert res.stdout.startswith(f"wrote {tmp_path / 'n.onnx'} (")  # --out decides, as typed
    res = CliRunner().invoke(main, ["export", str(run / "checkpoints" / "last.npz"), "--format", "html"])
    assert res.stdout.startswith(f"wrote {run / 'last.html'} (")


# ---------------------------------------------------------------------------
# Behaviour tables


def defined_tests() -> set[str]:
    names = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        names |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", path.read_text(encoding="utf-8"), re.M))
    return names


def behaviour_rows(path: Path) -> list[str]:
    """The rows of the behaviour tables of a document: all of docs/behaviour.md, and the
    section `## Behaviour` of any other document."""
    text = path.read_text(encoding="utf-8")
    if path.name != "behaviour.md":
        if "\n## Behaviour" not in text:
            return []
        text = text.split("\n## Behaviour", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [r for r in rows if not re.fullmatch(r"\|[\s:|-]+\|?", r) and not r.startswith("| when |")]


TABLES = [p for p in DOCS if behaviour_rows(p)]


def test_behaviour_md_has_its_table():
    assert ROOT / "docs" / "behaviour.md" in TABLES
    assert len(behaviour_rows(ROOT / "docs" / "behaviour.md")) >= 28


@pytest.mark.parametrize("path", TABLES, ids=[p.name for p in TABLES])
def test_every_behaviour_row_names_tests_that_exist(path):
    defined = defined_tests()
    named = set()
    for row in behaviour_rows(path):
        tests = re.findall(r"`(test_\w+)`", row.rstrip(" |").rsplit("|", 1)[-1])
        assert tests, f"{path.name}: a row names no test in its last column: {row[:100]}"
        named |= set(tests)
    assert named <= defined, f"{path.name} names tests that do not exist: {sorted(named - defined)}"


# ---------------------------------------------------------------------------
# A clone holds everything it needs


SKIP_DIRS = {".git", ".venv", ".hypothesis", ".pytest_cache", "__pycache__", "build", "dist", "runs", "results"}


def project_files() -> list[Path]:
    """The project's own text files: not the virtual environment, caches, runs or datasets."""
    files = []
    for folder, dirs, names in os.walk(ROOT):
        here = Path(folder)
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")
                   and not (here == ROOT / "data")]
        for name in names:
            path = here / name
            if path.is_file() and path.stat().st_size <= 2 << 20:
                files.append(path)
    return files


def test_no_file_of_the_project_points_outside_the_clone():
    checked, found = 0, []
    for path in project_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # pictures and other binary files
        checked += 1
        for number, line in enumerate(text.splitlines(), start=1):
            if any(o in line for o in OUTSIDE):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert checked >= 40  # the walk really read the project
    assert not found, "\n".join(found)


def test_training_md_documents_every_training_key():
    from mlecli.run.config import SCHEMA

    text = (ROOT / "docs" / "training.md").read_text()
    new = ["optimizer", "momentum", "beta1", "beta2", "epsilon", "prior_sd", "prior_biases", "schedule",
           "warmup_epochs", "decay_every", "decay_factor", "min_learning_rate", "plateau_patience",
           "plateau_factor", "patience", "shift"]
    assert set(new) <= set(SCHEMA["train"])
    for key in new:
        assert f"`{key}`" in text, key
