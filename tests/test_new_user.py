"""What a new user meets first: the messages and leftovers of a download that cannot
be done, and the hints that say what was meant."""

from __future__ import annotations

import tomllib

from click.testing import CliRunner

from mlecli.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_a_failed_download_leaves_no_empty_folders(tmp_path):
    data = tmp_path / "data"
    res = cli("download", "--mirror", tmp_path / "nothing-here", "--data-dir", data, "--retries", "0")
    assert res.exit_code == 1
    assert not data.exists()
    data.mkdir()
    res = cli("download", "--dataset", "fashion-mnist", "--mirror", tmp_path / "nothing-here", "--data-dir", data)
    assert res.exit_code == 1
    assert list(data.iterdir()) == []  # the folder given stays, empty as it was


def test_files_of_another_built_in_dataset_are_named_as_such(debian_fashion, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, blob in debian_fashion.items():
        (mirror / name).write_bytes(blob)
    res = cli("download", "--mirror", mirror, "--data-dir", tmp_path / "data", "-q")  # mnist, by default
    assert res.exit_code == 1
    assert ("(that is fashion-mnist's train-images-idx3-ubyte: to fetch fashion-mnist, use mlecli download "
            '--dataset fashion-mnist, or data.dataset = "fashion-mnist" in a config)') in res.stderr


def test_a_config_url_that_fails_is_named_as_what_to_check(tiny_config, tmp_path):
    res = cli("train", tiny_config(data={"url": str(tmp_path / "gone")}), "--data-dir", tmp_path / "d")
    assert res.exit_code == 1
    assert res.stderr.splitlines()[-1].endswith(
        ". Check the network, and the url of the tiny dataset in its config's [data] table")
    assert "--mirror" not in res.stderr.splitlines()[-1]


def test_an_unpinned_dataset_gets_one_warning_and_the_line_that_pins_it(tiny, tiny_folder, tmp_path):
    cfg = tmp_path / "mine.toml"
    cfg.write_text(f'[data]\ndataset = "mine"\nurl = "{tiny_folder}"\n')
    res = cli("download", "--config", cfg, "--data-dir", tmp_path / "d")
    assert res.exit_code == 0
    warning, pin = res.stderr.splitlines()
    assert warning == ("warning: train-images, train-labels, test-images, test-labels of mine are not pinned by a "
                       "sha256 in its config, so nothing tells if they change; to pin them as they are now, add this "
                       "line to the config's [data] table:")
    assert tomllib.loads(pin)["sha256"] == tiny.spec(()).sha256
    cfg.write_text(cfg.read_text() + pin + "\n")  # pasted as it says
    res = cli("download", "--config", cfg, "--data-dir", tmp_path / "d")
    assert res.exit_code == 0 and res.stderr == ""
    assert "UNVERIFIED" not in res.stdout and res.stdout.count(" verified ") == 4
