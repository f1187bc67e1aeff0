"""Configs: loading, every kind of refusal, overrides, the resolved TOML."""

import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mlecli.run import config
from mlecli.run.config import BUILTIN_CONFIGS, SCHEMA, from_dict, load, parse_override, to_toml
from mlecli.safe.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="c.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def refused(tmp_path, text, *overrides):
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load(p, overrides)
    return str(err.value).removeprefix(f"config {p}: ")


def test_builtin_default_has_the_documented_values():
    cfg = load(None)
    assert cfg.name == "default"
    assert cfg.data.dataset == "mnist" and cfg.data.validation == 0.1
    assert cfg.task.positive == (1, 3, 5, 7, 9) and cfg.task.negative == (0, 2, 4, 6, 8)
    assert cfg.model.hidden == (128,) and cfg.model.dtype == "float32"


@pytest.mark.parametrize("name", BUILTIN_CONFIGS)
def test_shipped_configs_load_and_equal_the_repo_copies(name):
    assert (ROOT / "configs" / f"{name}.toml").read_text() == config.builtin_config_text(name)
    assert load(name).name == name
    assert load(ROOT / "configs" / f"{name}.toml") == load(name)


@pytest.mark.parametrize("name", BUILTIN_CONFIGS)
def test_every_key_of_a_shipped_config_is_commented(name):
    lines = config.builtin_config_text(name).splitlines()
    for i, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            assert lines[i - 1].startswith("#"), f"{name}.toml: {line!r} has no comment above it"
    assert "SUM" in config.builtin_config_text(name)  # how the step scales with the batch


def test_empty_file_takes_every_default(tmp_path):
    cfg = load(write(tmp_path, ""))
    assert cfg.name == "c" and cfg.train.epochs == 20 and cfg.model.hidden == (128,)
    assert cfg.train.optimizer == "sgd" and cfg.train.prior is None and cfg.train.shift == 0


def test_the_default_config_is_the_schema_defaults_and_lists_every_key():
    # one source of defaults: configs/default.toml holds every key at its default
    text = tomllib.loads(config.builtin_config_text("default"))
    assert load(None) == from_dict({}, name="default")
    optional = {"data.url", "data.files", "data.sha256"}  # a custom dataset's, no default
    listed = {f"{s}.{k}" for s, keys in text.items() if isinstance(keys, dict) for k in keys}
    assert listed == {f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys} - optional
    for section, keys in SCHEMA.items():
        for k, (_, default) in keys.items():
            if f"{section}.{k}" not in optional:
                assert text[section][k] == default, f"{section}.{k}"


def test_unknown_key_suggests_the_closest(tmp_path):
    assert refused(tmp_path, "[train]\nepoch = 3\n") == "unknown key train.epoch (did you mean train.epochs?)"
    assert refused(tmp_path, "[modle]\nhidden = []\n") == "unknown key modle (did you mean model?)"
    assert refused(tmp_path, "[train]\nlearnig_rate = 0.1\n").endswith("(did you mean train.learning_rate?)")


def test_wrong_types_name_the_key_and_what_is_allowed(tmp_path):
    assert refused(tmp_path, '[train]\nepochs = "3"\n') == "train.epochs = '3': must be an integer >= 1"
    assert refused(tmp_path, "[train]\nepochs = 2.5\n") == "train.epochs = 2.5: must be an integer >= 1"
    assert refused(tmp_path, "[train]\nepochs = true\n") == "train.epochs = true: must be an integer >= 1"
    assert (
        refused(tmp_path, "[model]\nhidden = [0]\n")
        == "model.hidden = [0]: hidden must be a list of positive integers ([] = logistic regression)"
    )
    assert refused(tmp_path, '[model]\ndtype = "float16"\n') == (
        "model.dtype = 'float16': must be one of 'float32', 'float64'"
    )
    assert refused(tmp_path, "train = 3\n") == "train must be a table ([train]), got 3"


def test_out_of_range_values(tmp_path):
    assert refused(tmp_path, "[train]\nlearning_rate = -0.1\n") == (
        "train.learning_rate = -0.1: must be a finite number > 0"
    )
    assert refused(tmp_path, "[train]\nlearning_rate = inf\n") == "train.learning_rate = inf: must be a finite number > 0"
    assert refused(tmp_path, "[train]\nbatch_size = 0\n") == "train.batch_size = 0: must be an integer >= 1"
    assert refused(tmp_path, "[data]\nvalidation = 1.0\n").startswith("data.validation = 1.0: must be a fraction")
    assert refused(tmp_path, "[task]\npositive = [10]\n") == (
        "task.positive = [10]: must be a non-empty list of digits 0-9"
    )
    assert refused(tmp_path, "[task]\npositive = []\n") == "task.positive = []: must be a non-empty list of digits 0-9"
    assert refused(tmp_path, "[task]\npositive = [1, 1]\n") == "task.positive = [1, 1]: lists a digit twice"
    assert refused(tmp_path, '[task]\nnegative = "others"\n') == (
        "task.negative = 'others': must be a non-empty list of digits 0-9 or \"rest\""
    )


def test_overlapping_digits_are_refused(tmp_path):
    assert refused(tmp_path, "[task]\npositive = [4, 9]\nnegative = [9, 7]\n") == (
        "task.positive and task.negative both list [9]: a digit can be in one class only"
    )


def test_rest_means_every_other_digit(tmp_path):
    cfg = load(write(tmp_path, '[task]\npositive = [0]\nnegative = "rest"\n'))
    assert cfg.task.negative_digits == (1, 2, 3, 4, 5, 6, 7, 8, 9)


def test_a_network_too_big_for_memory_is_refused_before_allocating(tmp_path):
    msg = refused(tmp_path, "[model]\nhidden = [1000000000]\n")
    assert msg.startswith("model.hidden = [1000000000] with train.batch_size = 32: the network would need about ")
    assert "TiB of memory, more than this machine's" in msg


def test_unknown_dataset_needs_a_url(tmp_path):
    assert refused(tmp_path, '[data]\ndataset = "cifar"\n') == (
        "data.dataset = 'cifar' is not built in (mnist, fashion-mnist): "
        "set data.url to the base URL or local folder of its IDX files"
    )


def test_custom_dataset_keys_are_checked(tmp_path):
    base = '[data]\ndataset = "mine"\nurl = "http://x/"\n'
    assert refused(tmp_path, base + 'sha256 = { train-images = "abc" }\n') == (
        "data.sha256.train-images = 'abc': must be 64 lower-case hex digits"
    )
    assert refused(tmp_path, base + 'files = { train-imgs = "a" }\n') == (
        "data.files: unknown file 'train-imgs' (allowed: train-images, train-labels, test-images, test-labels)"
    )


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
@pytest.mark.parametrize("key, table, shown", [
    ("sha256", '{ bogus = "00", train-images = "zz" }', "{bogus = '00', train-images = 'zz'}"),
    ("files", '{ nonsense = "x" }', "{nonsense = 'x'}"),
    ("files", '{ train-images = "train-images-idx3-ubyte" }', "{train-images = 'train-images-idx3-ubyte'}"),
    ("sha256", "{}", "{}"),
])
def test_a_built_in_dataset_refuses_files_and_sha256(tmp_path, dataset, key, table, shown):
    """They name a custom dataset's files; a built-in one's are pinned: given, they would be ignored."""
    assert refused(tmp_path, f'[data]\ndataset = "{dataset}"\n{key} = {table}\n') == (
        f"data.{key} = {shown}: only for a custom dataset; {dataset}'s file names and hashes are built in "
        f"(remove data.{key})"
    )


def test_invalid_toml_names_the_file(tmp_path):
    p = write(tmp_path, "[train\n")
    with pytest.raises(ConfigError, match=rf"^config {p}: not valid TOML: "):
        load(p)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"does not exist \(built-in configs: default, logreg, four-vs-nine, deep, accurate\)"):
        load(tmp_path / "nope.toml")


def test_overrides_are_parsed_as_toml_and_type_checked(tmp_path):
    cfg = load(None, ["train.epochs=3", "model.hidden=[256, 64]", "data.dataset=fashion-mnist", "train.learning_rate=1e-3"])
    assert cfg.train.epochs == 3 and cfg.model.hidden == (256, 64)
    assert cfg.data.dataset == "fashion-mnist" and cfg.train.learning_rate == 0.001
    with pytest.raises(ConfigError, match=r"^--set: train.epochs = 'three': must be an integer >= 1$"):
        load(None, ["train.epochs=three"])
    with pytest.raises(ConfigError, match=r"unknown key train.epohcs \(did you mean train.epochs\?\)"):
        load(None, ["train.epohcs=3"])


def test_malformed_overrides():
    with pytest.raises(ConfigError, match=r"^--set 'epochs': expected KEY=VALUE, e.g. --set train.epochs=3$"):
        parse_override("epochs")
    with pytest.raises(ConfigError, match=r"^--set 'model.hidden=\[1,': '\[1,' is not a valid TOML value \(a value "
                       r"with spaces must be one quoted argument: --set 'model.hidden=\[1, …'\)$"):
        parse_override("model.hidden=[1,")
    assert parse_override("data.sha256.train-images=abc") == (["data", "sha256", "train-images"], "abc")


def test_resolved_toml_round_trips(tmp_path):
    cfg = load(None, ["task.negative=\"rest\"", "task.positive=[3]", "train.learning_rate=0.00025", "data.validation=500"])
    text = to_toml(cfg)
    assert from_dict(tomllib.loads(text), name="other") == cfg
    odd = from_dict({"data": {"dataset": "mine", "url": "/we\"ird\n\x7f\u00e9"}}, name="n")
    assert from_dict(tomllib.loads(to_toml(odd)), name="n") == odd


def test_schema_defaults_pass_their_own_checks():
    for section, keys in SCHEMA.items():
        for key, (check, default) in keys.items():
            if default is not None:
                check(f"{section}.{key}", default)


def test_default_config_loads_outside_the_repo(tmp_path):
    # An installed mlecli finds its built-in configs in the package, whatever the cwd.
    env = {**os.environ, "PYTHONPATH": ""}
    code = "from mlecli.run.config import load; c = load(None); d = load('deep'); print(c.name, c.model.hidden, d.name)"
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "default (128,) deep\n"


@pytest.mark.parametrize("line, message", [
    ('optimizer = "rmsprop"', "train.optimizer = 'rmsprop': must be one of 'sgd', 'momentum', 'nesterov', 'adam'"),
    ("momentum = 1.0", "train.momentum = 1.0: must be a number from 0 (inclusive) up to (not including) 1"),
    ("momentum = -0.1", "train.momentum = -0.1: must be a number from 0 (inclusive) up to (not including) 1"),
    ('beta1 = "0.9"', "train.beta1 = '0.9': must be a number from 0 (inclusive) up to (not including) 1"),
    ("beta2 = 1", "train.beta2 = 1: must be a number from 0 (inclusive) up to (not including) 1"),
    ("epsilon = 0", "train.epsilon = 0: must be a finite number > 0"),
    ("epsilon = nan", "train.epsilon = nan: must be a finite number > 0"),
    ("prior_sd = 0", 'train.prior_sd = 0: must be a finite number of at least 1e-06 (the prior\'s standard deviation), or "none" '
                     "for no prior"),
    ('prior_sd = "off"', 'train.prior_sd = \'off\': must be a finite number of at least 1e-06 (the prior\'s standard deviation), '
                         'or "none" for no prior'),
    ("prior_sd = inf", 'train.prior_sd = inf: must be a finite number of at least 1e-06 (the prior\'s standard deviation), '
                       'or "none" for no prior'),
    ("prior_biases = 1", "train.prior_biases = 1: must be true or false"),
    ('schedule = "linear"', "train.schedule = 'linear': must be one of 'constant', 'step', 'cosine'"),
    ("warmup_epochs = -1", "train.warmup_epochs = -1: must be a finite number >= 0"),
    ("decay_every = 0", "train.decay_every = 0: must be an integer >= 1"),
    ("decay_factor = 0", "train.decay_factor = 0: must be a number from 0 (exclusive) up to (not including) 1"),
    ("decay_factor = 1.5", "train.decay_factor = 1.5: must be a number from 0 (exclusive) up to (not including) 1"),
    ("min_learning_rate = -0.01", "train.min_learning_rate = -0.01: must be a finite number >= 0"),
    ("plateau_patience = -1", "train.plateau_patience = -1: must be an integer >= 0"),
    ("plateau_factor = 1", "train.plateau_factor = 1: must be a number from 0 (exclusive) up to (not including) 1"),
    ("patience = 2.5", "train.patience = 2.5: must be an integer >= 0"),
    ("shift = 9", "train.shift = 9: must be an integer from 0 to 8"),
    ("shift = -1", "train.shift = -1: must be an integer from 0 to 8"),
    ("warmup_epochs = 20", "train.warmup_epochs = 20 must be less than train.epochs = 20: "
                           "the warm-up would take the whole run"),
    ('schedule = "cosine"\nmin_learning_rate = 0.05', "train.min_learning_rate = 0.05 must be below "
     "train.learning_rate = 0.05 (sgd's own rate, as none is set for sgd): the cosine schedule decays from the one "
     "to the other"),
    ('schedule = "cosine"\nlearning_rate = 0.05\nmin_learning_rate = 0.05', "train.min_learning_rate = 0.05 must be "
     "below train.learning_rate = 0.05: the cosine schedule decays from the one to the other"),
])
def test_each_training_key_refuses_bad_values_naming_what_is_allowed(tmp_path, line, message):
    assert refused(tmp_path, f"[train]\n{line}\n") == message


@pytest.mark.parametrize("key", ["patience", "plateau_patience"])
def test_watching_the_validation_ll_needs_validation_images(tmp_path, key):
    assert refused(tmp_path, f"[data]\nvalidation = 0\n[train]\n{key} = 3\n") == (
        f"train.{key} = 3 watches the validation log-likelihood, but data.validation = 0 holds out no images: "
        f"set data.validation (e.g. 0.1) or train.{key} = 0"
    )


def test_training_keys_load_and_round_trip(tmp_path):
    cfg = load(write(tmp_path, '[train]\noptimizer = "adam"\nprior_sd = 2\nprior_biases = true\nschedule = "cosine"\n'
                               "warmup_epochs = 0.5\nshift = 2\npatience = 3\n"))
    t = cfg.train
    assert (t.optimizer, t.prior, t.prior_biases, t.schedule, t.warmup_epochs, t.shift, t.patience) == (
        "adam", 2.0, True, "cosine", 0.5, 2, 3)
    assert from_dict(tomllib.loads(to_toml(cfg)), name="c") == cfg


def test_the_memory_estimate_counts_the_update_rules_state(tmp_path, monkeypatch):
    from mlecli.safe import resources

    sgd, adam = (resources.estimate((128,), 32, "float32", state_slots=s) for s in (0, 2))
    params = (784 + 1) * 128 + 129
    assert adam - sgd == 2 * params * 4
    monkeypatch.setattr(resources, "physical_memory", lambda: sgd + 1)
    load(write(tmp_path, "[model]\nhidden = [128]\n"))
    assert "the network would need about" in refused(tmp_path, '[train]\noptimizer = "adam"\n')


_NUMBERS = st.one_of(st.integers(-(10 ** 500), 10 ** 500), st.integers(-(2 ** 70), 2 ** 70),
                     st.floats(allow_nan=True, allow_infinity=True))


def _toml_number(v) -> str:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return repr(v)


@given(key=st.sampled_from([k for k in config.ALL_KEYS if "." in k]), value=_NUMBERS, as_list=st.booleans())
@settings(max_examples=300, deadline=None)
def test_any_number_for_any_key_is_a_config_or_one_line_naming_the_key(key, value, as_list):
    """Integers of hundreds of digits (valid TOML) once overflowed float() into a traceback."""
    text = _toml_number(value)
    item = f"{key}=[{text}]" if as_list else f"{key}={text}"
    try:
        cfg = load(None, [item])
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("--set: ") and key in message and "\n" not in message and len(message) < 400, message
    else:
        for section in cfg.to_dict().values():
            for v in section.values() if isinstance(section, dict) else ():
                for x in v if isinstance(v, (list, tuple)) else (v,):
                    assert not isinstance(x, int) or abs(x) < 2 ** 63


@pytest.mark.parametrize("name", ["", " "])
def test_an_empty_config_name_is_named_as_such(name):
    with pytest.raises(ConfigError, match=r"^config .* is an empty name: give a TOML file, or the name of a built-in"):
        load(name)


# ---------------------------------------------------------------------------
# Each update rule's own learning rate


@pytest.mark.parametrize("rule, rate", [("sgd", 0.05), ("momentum", 0.005), ("nesterov", 0.005), ("adam", 0.001)])
def test_a_config_that_sets_no_rate_trains_at_its_rules_own(tmp_path, rule, rate):
    assert load(write(tmp_path, f'[train]\noptimizer = "{rule}"\n')).train.learning_rate == rate
    assert config.DEFAULT_RATES[rule] == rate


def test_another_rule_by_set_trains_at_its_own_rate_and_says_so():
    notes = []
    cfg = load(None, ["train.optimizer=adam"], note=notes.append)
    assert (cfg.train.optimizer, cfg.train.learning_rate) == ("adam", 0.001)
    assert notes == ["note: train.optimizer = 'adam' trains at adam's own learning rate, 0.001: train.learning_rate "
                     "= 0.05 in the built-in config default is for sgd (set train.learning_rate to choose another)"]


@pytest.mark.parametrize("name, rule, rate", [("deep", "adam", 0.001), ("logreg", "momentum", 0.005),
                                              ("accurate", "sgd", 0.05), ("accurate", "nesterov", 0.005)])
def test_each_shipped_configs_rate_is_for_its_own_rule(name, rule, rate):
    assert load(name, [f"train.optimizer={rule}"]).train.learning_rate == rate


@pytest.mark.parametrize("overrides", [
    ["train.optimizer=adam", "train.learning_rate=0.02"],
    ["train.learning_rate=0.02", "train.optimizer=adam"],
    ["train={optimizer='adam', learning_rate=0.02}"],
])
def test_a_rate_set_on_the_command_line_is_kept_whatever_the_rule(overrides):
    cfg = load(None, overrides)
    assert (cfg.train.optimizer, cfg.train.learning_rate) == ("adam", 0.02)


def test_a_config_keeps_its_rate_for_its_own_rule(tmp_path):
    p = write(tmp_path, '[train]\noptimizer = "momentum"\nlearning_rate = 0.02\n')
    for overrides in ([], ["train.optimizer=momentum"], ["train.epochs=3"]):
        assert load(p, overrides).train.learning_rate == 0.02
    assert load(p, ["train.optimizer=sgd"]).train.learning_rate == 0.05


def test_a_rate_far_above_its_rules_own_gets_a_note_and_is_kept(tmp_path):
    notes = []
    cfg = load(write(tmp_path, '[train]\noptimizer = "adam"\nlearning_rate = 0.05\n'), note=notes.append)
    assert cfg.train.learning_rate == 0.05
    assert notes == ["note: train.learning_rate = 0.05 is 50 times adam's own rate (0.001, what it trains at when "
                     "the rate is not set): if the run learns nothing or diverges, try a smaller one"]
    for shipped in BUILTIN_CONFIGS:  # 0.01 to 0.1, each with its own rule: no note
        load(shipped, note=notes.append)
    assert len(notes) == 1


def test_a_wrong_rate_is_refused_even_where_another_rule_takes_its_own(tmp_path):
    assert refused(tmp_path, "[train]\nlearning_rate = -1\n", "train.optimizer=adam") == (
        "train.learning_rate = -1: must be a finite number > 0")


def test_the_cosine_floor_names_the_rules_own_rate_when_the_config_set_none():
    with pytest.raises(ConfigError) as err:
        load(None, ["train.optimizer=adam", "train.schedule=cosine", "train.min_learning_rate=0.01"])
    assert str(err.value) == (
        "--set: train.min_learning_rate = 0.01 must be below train.learning_rate = 0.001 (adam's own rate, as none is "
        "set for adam): the cosine schedule decays from the one to the other")


def test_the_resolved_config_records_the_rate_used(tmp_path):
    cfg = load(None, ["train.optimizer=nesterov"])
    assert "learning_rate = 0.005\n" in to_toml(cfg)
    assert load(write(tmp_path, to_toml(cfg)), ["train.epochs=3"]).train.learning_rate == 0.005


@pytest.mark.parametrize("overrides, advice", [
    (["train.learning_rate=5", "train.batch_size=16"],
     "train.learning_rate = 5 is too large for sgd at batches of 16 (the step grows with the batch, since the LL is "
     "a sum): start a new run with a smaller one, such as 0.05, sgd's own rate (--resume cannot change it)"),
    (["train.batch_size=512"],
     "train.learning_rate = 0.05 is too large for sgd at batches of 512 (the step grows with the batch, since the LL "
     "is a sum): start a new run with a smaller one, such as 0.005, a tenth of it (--resume cannot change it)"),
    (["train.optimizer=momentum", "train.learning_rate=0.05"],
     "train.learning_rate = 0.05 is too large for momentum at batches of 32 (the step grows with the batch, since "
     "the LL is a sum, and momentum μ = 0.9 multiplies it by about 1/(1 − μ) = 10): start a new run with a smaller "
     "one, such as 0.005, momentum's own rate (--resume cannot change it)"),
    (["train.optimizer=adam", "train.learning_rate=0.05"],
     "train.learning_rate = 0.05 is too large for adam, whose step is about η for each weight whatever the batch: "
     "start a new run with a smaller one, such as 0.001, adam's own rate (--resume cannot change it)"),
    (["train.optimizer=adam", "train.learning_rate=0.0015"],
     "train.learning_rate = 0.0015 is too large for adam, whose step is about η for each weight whatever the batch: "
     "start a new run with a smaller one, such as 0.00015, a tenth of it (--resume cannot change it)"),
])
def test_the_advice_for_a_rate_that_overshot_names_a_smaller_one(overrides, advice):
    assert config.rate_advice(load(None, overrides).train) == advice


@pytest.mark.parametrize("value, as_json, as_config", [
    ("adam", '"adam"', "'adam'"),
    (True, "true", "true"),
    (None, "null", "None"),
    ([1, "a"], '[1, "a"]', "[1, 'a']"),
    (2 ** 70, "an integer of 22 digits", "an integer of 22 digits"),
    (0.5, "0.5", "0.5"),
    ("x" * 50, '"' + "x" * 36 + "...", "'" + "x" * 50 + "'"),  # a file's value is cut short, a config's is not
])
def test_a_value_in_a_message_is_shown_as_json_or_as_a_config_has_it(value, as_json, as_config):
    from mlecli.safe.schema import show_value

    assert (show_value(value), show_value(value, toml=True)) == (as_json, as_config)
