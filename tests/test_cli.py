import subprocess
import sys

from click.testing import CliRunner

from mlecli import __version__
from mlecli.cli import main


def test_version():
    res = CliRunner().invoke(main, ["--version"])
    assert res.exit_code == 0
    assert res.output == f"mlecli, version {__version__}\n"


def test_python_dash_m_runs_the_cli():
    res = subprocess.run([sys.executable, "-m", "mlecli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0
    assert res.stdout == f"mlecli, version {__version__}\n"


def test_help_does_not_import_the_heavy_libraries():
    # Start-up time is measured in benchmarks/; what keeps it low is held here.
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from mlecli.cli import main\n"
        "for args in (['--help'], ['download', '--help']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 0\n"
        "print(sorted(m for m in ('numpy', 'requests', 'tqdm') if m in sys.modules))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.stdout == "[]\n", res.stderr


def test_unknown_command_is_a_usage_error():
    res = CliRunner().invoke(main, ["fly"])
    assert res.exit_code == 2
    assert "No such command 'fly'" in res.stderr


def test_bad_option_value_is_a_usage_error():
    res = CliRunner().invoke(main, ["download", "--dataset", "cifar"])
    assert res.exit_code == 2
    assert "Invalid value for '--dataset'" in res.stderr
