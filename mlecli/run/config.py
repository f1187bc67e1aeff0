"""Configs: TOML files plus typed `--set key=value` overrides, parsed once into frozen dataclasses.

Everything downstream takes a `Config`, never a raw dict. Unknown keys, wrong types and
out-of-range values are refused before anything starts, with the key's full name, the
bad value, what is allowed, and the closest valid key for a typo.
"""

from __future__ import annotations

import difflib
import json
import math
import shlex
import stat
import sys
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from mlecli.data.datasets import BUILTIN, Dataset, builtin, custom
from mlecli.data.download import url_problem
from mlecli.safe.errors import ConfigError
from mlecli.safe.files import open_regular
from mlecli.safe.resources import check_fits
from mlecli.safe.schema import is_int, is_number, show_value

DTYPES = ("float32", "float64")
DIGITS = range(10)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam")
# Each update rule's own learning rate: what a config that does not set train.learning_rate
# trains with, and one whose rate was written for another rule (apply_overrides). sgd's is
# the default config's; momentum and nesterov multiply the steady step by about
# 1/(1 − μ) = 10, so a tenth of it takes about the same step; Adam's step is about η per
# weight, whatever the batch and the scale of the gradient (PyTorch's default rate).
DEFAULT_RATES = {"sgd": 0.05, "momentum": 0.005, "nesterov": 0.005, "adam": 0.001}
FAR_FROM_DEFAULT = 10  # a rate this many times the rule's own (or more) gets a note before a run
SCHEDULES = ("constant", "step", "cosine")
MAX_SHIFT = 8


# ---------------------------------------------------------------------------
# Checks. Each takes the full key and the value as TOML gave it, returns the clean
# value or raises.


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"{key} = {show_value(value, toml=True)}: {allowed}")


def _show_table(v: dict[str, str]) -> str:
    text = "{" + ", ".join(f"{k} = {show_value(x, toml=True)}" for k, x in v.items()) + "}"
    return text if len(text) <= 120 else text[:117] + "..."


BIG = 1 << 63  # every integer of a config is below this: sums and products of a few stay usable as floats


def int_in(lo: int, hi: int | None = None) -> Callable[[str, Any], int]:
    def check(key: str, v: Any) -> int:
        if not is_int(v) or v < lo or (hi is not None and v > hi):
            bound = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
            raise _fail(key, v, f"must be {bound}")
        if v >= BIG:
            raise _fail(key, v, f"must be an integer >= {lo} and below 2**63")
        return v

    return check


def positive_float(key: str, v: Any) -> float:
    if not is_number(v) or v <= 0:
        raise _fail(key, v, "must be a finite number > 0")
    return float(v)


def non_negative_float(key: str, v: Any) -> float:
    if not is_number(v) or v < 0:
        raise _fail(key, v, "must be a finite number >= 0")
    return float(v)


def fraction(lo_closed: bool) -> Callable[[str, Any], float]:
    """A number in [0, 1) (lo_closed) or (0, 1)."""

    def check(key: str, v: Any) -> float:
        if not is_number(v) or v >= 1 or v < 0 or (v == 0 and not lo_closed):
            raise _fail(key, v, f"must be a number from 0 ({'inclusive' if lo_closed else 'exclusive'}) "
                                "up to (not including) 1")
        return float(v)

    return check


def a_bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _fail(key, v, "must be true or false")
    return v


MIN_PRIOR_SD = 1e-6  # smaller, and 1/σ² is no longer a usable number (σ = 1e-200: 1/σ² overflows)


def sd_or_none(key: str, v: Any) -> float | str:
    if v == "none":
        return "none"
    if not is_number(v) or not v >= MIN_PRIOR_SD:
        raise _fail(key, v, f"must be a finite number of at least {MIN_PRIOR_SD:g} (the prior's standard deviation), "
                    'or "none" for no prior')
    return float(v)


def one_of(*choices: str) -> Callable[[str, Any], str]:
    def check(key: str, v: Any) -> str:
        if v not in choices:
            raise _fail(key, v, f"must be one of {', '.join(map(repr, choices))}")
        return v

    return check


def a_string(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _fail(key, v, "must be a non-empty string")
    return v


def run_name(key: str, v: Any) -> str:
    """A name that is safe as a folder name: it names the run folder runs/<name>-<time>."""
    if (not isinstance(v, str) or not 0 < len(v) <= 100 or len(v.encode("utf-8", "surrogatepass")) > 200
            or v.startswith(".") or "/" in v or "\\" in v or not all(c.isprintable() for c in v)):
        raise _fail(key, v, "must be a plain name for the run folder: 1-100 printable characters (200 bytes), "
                    "no '/' or '\\', not starting with '.' (set name = \"...\" in the config)")
    return v


def string_table(key: str, v: Any) -> dict[str, str]:
    if not isinstance(v, dict) or not all(isinstance(x, str) for x in v.values()):
        raise _fail(key, v, "must be a table of strings, e.g. {train-images = \"...\"}")
    return dict(v)


def validation_share(key: str, v: Any) -> float | int:
    if is_int(v) and 0 <= v < BIG:
        return v
    if isinstance(v, float) and 0 <= v < 1:
        return v
    raise _fail(key, v, "must be a fraction from 0 up to (not including) 1, or a whole count of images >= 0")


def digit_list(key: str, v: Any, *, allow_rest: bool = False) -> tuple[int, ...] | str:
    if allow_rest and v == "rest":
        return "rest"
    rest = ' or "rest"' if allow_rest else ""
    if not isinstance(v, list) or not v or not all(is_int(d) and 0 <= d <= 9 for d in v):
        raise _fail(key, v, f"must be a non-empty list of digits 0-9{rest}")
    if len(set(v)) != len(v):
        raise _fail(key, v, "lists a digit twice")
    return tuple(v)


def digits_or_rest(key: str, v: Any) -> tuple[int, ...] | str:
    return digit_list(key, v, allow_rest=True)


MAX_LAYERS = 32  # a checkpoint holds each layer's arrays and their update-rule state: npz.MAX_MEMBERS bounds them


def hidden_sizes(key: str, v: Any) -> tuple[int, ...]:
    if not isinstance(v, list) or not all(is_int(n) and n > 0 for n in v):
        raise _fail(key, v, "hidden must be a list of positive integers ([] = logistic regression)")
    if any(n >= BIG for n in v):
        raise _fail(key, v, "a layer's units must be below 2**63")
    if len(v) > MAX_LAYERS:
        raise _fail(key, v, f"at most {MAX_LAYERS} hidden layers")
    return tuple(v)


def key(default: Any, check: Callable[[str, Any], Any]) -> Any:
    """A config key, declared once: its default (the clean value) and its check."""
    return field(default=default, metadata={"check": check})


# ---------------------------------------------------------------------------
# The keys: one dataclass per section, each field a key with its default and its check.
# configs/default.toml lists every key at its default (a test holds the two equal).


@dataclass(frozen=True)
class DataConfig:
    dataset: str = key("mnist", a_string)
    url: str | None = key(None, a_string)
    files: dict[str, str] | None = key(None, string_table)
    sha256: dict[str, str] | None = key(None, string_table)
    validation: float | int = key(0.1, validation_share)

    def resolve(self) -> Dataset:
        """The Dataset this table describes (a built-in one, or a custom IDX dataset)."""
        if self.url is not None:

            problem = url_problem(self.url)
            if problem is not None:
                raise ConfigError(f"data.url = {self.url!r}: {problem}")
        if self.dataset in BUILTIN:
            for name in ("files", "sha256"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"data.{name} = {_show_table(getattr(self, name))}: only for a custom dataset; "
                        f"{self.dataset}'s file names and hashes are built in (remove data.{name})")
            ds = builtin(self.dataset)
            if self.url is None:
                return ds
            return Dataset(ds.name, (self.url, *ds.mirrors), ds.files, ds.sha256, ds.sizes, ds.digits)
        if self.url is None:
            raise ConfigError(
                f"data.dataset = {self.dataset!r} is not built in ({', '.join(BUILTIN)}): "
                "set data.url to the base URL or local folder of its IDX files"
            )
        return custom(self.dataset, self.url, self.files, self.sha256, where="data")


@dataclass(frozen=True)
class TaskConfig:
    positive: tuple[int, ...] = key((1, 3, 5, 7, 9), digit_list)
    negative: tuple[int, ...] | str = key((0, 2, 4, 6, 8), digits_or_rest)

    @property
    def negative_digits(self) -> tuple[int, ...]:
        if self.negative == "rest":
            return tuple(d for d in DIGITS if d not in self.positive)
        return self.negative  # type: ignore[return-value]

    def describe(self) -> str:
        neg = "rest" if self.negative == "rest" else ",".join(map(str, self.negative))
        return f"{','.join(map(str, self.positive))} vs {neg}"


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = key((128,), hidden_sizes)
    dtype: str = key("float32", one_of(*DTYPES))
    seed: int = key(0, int_in(0))


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = key(20, int_in(1))
    batch_size: int = key(32, int_in(1))
    learning_rate: float = key(DEFAULT_RATES["sgd"], positive_float)  # left out: the rule's own (from_dict)
    seed: int = key(0, int_in(0))
    checkpoint_every: int = key(1, int_in(1))
    log_every: int = key(0, int_in(0))
    # the update rule and its numbers (optim.py)
    optimizer: str = key("sgd", one_of(*OPTIMIZERS))
    momentum: float = key(0.9, fraction(lo_closed=True))
    beta1: float = key(0.9, fraction(lo_closed=True))
    beta2: float = key(0.999, fraction(lo_closed=True))
    epsilon: float = key(1e-8, positive_float)
    # a Gaussian prior on the weights (maximum a posteriori)
    prior_sd: float | str = key("none", sd_or_none)
    prior_biases: bool = key(False, a_bool)
    # the learning-rate schedule (schedule.py)
    schedule: str = key("constant", one_of(*SCHEDULES))
    warmup_epochs: float = key(0.0, non_negative_float)
    decay_every: int = key(10, int_in(1))
    decay_factor: float = key(0.1, fraction(lo_closed=False))
    min_learning_rate: float = key(0.0, non_negative_float)
    plateau_patience: int = key(0, int_in(0))
    plateau_factor: float = key(0.5, fraction(lo_closed=False))
    # early stopping, and shifted digits
    patience: int = key(0, int_in(0))
    shift: int = key(0, int_in(0, MAX_SHIFT))

    @property
    def prior(self) -> float | None:
        """The prior's σ, or None for none (plain maximum likelihood)."""
        return None if self.prior_sd == "none" else float(self.prior_sd)


@dataclass(frozen=True)
class Config:
    name: str
    data: DataConfig
    task: TaskConfig
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["task"]["positive"] = list(self.task.positive)
        d["task"]["negative"] = "rest" if self.task.negative == "rest" else list(self.task.negative)
        d["model"]["hidden"] = list(self.model.hidden)
        for k in ("url", "files", "sha256"):
            if d["data"][k] is None:
                del d["data"][k]
        return d


SECTIONS = {"data": DataConfig, "task": TaskConfig, "model": ModelConfig, "train": TrainConfig}


def _raw(value: Any) -> Any:
    """A clean value as TOML gives it (tuples are lists there)."""
    return list(value) if isinstance(value, tuple) else value


# Derived from the dataclasses: section → key → (check, default as TOML gives it).
SCHEMA: dict[str, dict[str, tuple[Callable[[str, Any], Any], Any]]] = {
    section: {f.name: (f.metadata["check"], _raw(f.default)) for f in fields(cls)} for section, cls in SECTIONS.items()
}
TOP_LEVEL = {"name"}
ALL_KEYS = sorted([*TOP_LEVEL, *SCHEMA, *(f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys)])


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, ALL_KEYS, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(k for k in ALL_KEYS if '.' in k)})"
    return ConfigError(f"unknown key {key}{hint}")


def from_dict(raw: dict[str, Any], *, name: str) -> Config:
    """Validate a parsed TOML document into a Config. Raises ConfigError naming the key."""
    for key, value in raw.items():
        if key in TOP_LEVEL:
            continue
        if key not in SCHEMA:
            raise _unknown(key)
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a table ([{key}]), got {show_value(value, toml=True)}")
        for sub in value:
            if sub not in SCHEMA[key]:
                raise _unknown(f"{key}.{sub}")
    name = run_name("name", raw.get("name", name))
    sections = {}
    for section, cls in SECTIONS.items():
        given = raw.get(section, {})
        rule = given.get("optimizer", "sgd")
        if section == "train" and "learning_rate" not in given and isinstance(rule, str) and rule in DEFAULT_RATES:
            given = {**given, "learning_rate": DEFAULT_RATES[rule]}
        sections[section] = cls(**{f.name: f.metadata["check"](f"{section}.{f.name}", given[f.name])
                                   for f in fields(cls) if f.name in given})
    cfg = Config(name=name, **sections)
    _cross_checks(cfg, rate_given="learning_rate" in raw.get("train", {}))
    return cfg


def _cross_checks(cfg: Config, *, rate_given: bool = True) -> None:
    if cfg.task.negative != "rest":
        both = sorted(set(cfg.task.positive) & set(cfg.task.negative))
        if both:
            raise ConfigError(
                f"task.positive and task.negative both list {show_value(both, toml=True)}: a digit can be in one "
                "class only"
            )
    elif len(cfg.task.positive) == 10:
        raise ConfigError('task.negative = "rest" leaves no digits when task.positive lists all ten')
    cfg.data.resolve()  # dataset name, url, files and hashes are checked here
    t = cfg.train
    if t.schedule == "cosine" and t.min_learning_rate >= t.learning_rate:
        own = "" if rate_given else f" ({t.optimizer}'s own rate, as none is set for {t.optimizer})"
        raise ConfigError(
            f"train.min_learning_rate = {t.min_learning_rate:g} must be below train.learning_rate = "
            f"{t.learning_rate:g}{own}: the cosine schedule decays from the one to the other"
        )
    if t.warmup_epochs >= t.epochs:
        raise ConfigError(
            f"train.warmup_epochs = {t.warmup_epochs:g} must be less than train.epochs = {t.epochs}: "
            "the warm-up would take the whole run"
        )
    if cfg.data.validation == 0:
        for name, value in (("plateau_patience", t.plateau_patience), ("patience", t.patience)):
            if value:
                raise ConfigError(
                    f"train.{name} = {value} watches the validation log-likelihood, but data.validation = 0 "
                    f"holds out no images: set data.validation (e.g. 0.1) or train.{name} = 0"
                )
    _fits_the_dtype(cfg)
    check_fits(cfg.model.hidden, t.batch_size, cfg.model.dtype, state_slots=STATE_SLOTS[t.optimizer])


def _fits_the_dtype(cfg: Config) -> None:
    """Refuse a number the update's arithmetic in model.dtype would hold as 0, a subnormal, inf
    or (for a fraction below 1) as 1: the training would not do what the config says (Adam with
    ε held as 0 divides 0 by 0 where a weight's gradient is 0, e.g. a border pixel's)."""
    t, dtype = cfg.train, cfg.model.dtype
    info = np.finfo(dtype)
    tiny, top = float(info.tiny), float(info.max)
    where = f"model.dtype = {dtype!r} holds numbers up to {top:.8g}"
    for name in ("learning_rate", "min_learning_rate", "momentum", "beta1", "beta2"):
        v = getattr(t, name)
        # a rate reaches the first layer as η/255 (pixels are scaled by 1/255 inside the step)
        floor, why = (255 * tiny, f"η/255, the first layer's rate, would be below the smallest normal {dtype} number"
                      ) if "learning_rate" in name else (tiny, f"it is below the smallest normal {dtype} number")
        if 0 < v < floor:
            zero = "at least" if name == "learning_rate" else "0 or at least"
            raise ConfigError(f"train.{name} = {v:g}: {why} ({tiny:.8g}; model.dtype = {dtype!r}), where it becomes 0 "
                              f"or loses its digits; use {zero} {floor:.8g}")
        if v > top:
            raise ConfigError(f"train.{name} = {v:g} is above the largest {dtype} number: {where}")
        if name in ("momentum", "beta1", "beta2") and np.dtype(dtype).type(v) == 1:
            below = float(np.nextafter(np.dtype(dtype).type(1), np.dtype(dtype).type(0)))
            raise ConfigError(f"train.{name} = {v!r} rounds to 1 in {dtype} (model.dtype), and it must be below 1: "
                              f"use at most {below!r}")
    # Adam adds ε·√(1 − β₂ᵗ) to √v (optim._AdamFast); it is smallest at the first step
    eps_first = t.epsilon * math.sqrt(1.0 - t.beta2)
    if not eps_first >= tiny:
        need = tiny / math.sqrt(1.0 - t.beta2)
        raise ConfigError(
            f"train.epsilon = {t.epsilon:g}: Adam's first step adds ε·√(1 − train.beta2) = {eps_first:.3g}, below the "
            f"smallest normal {dtype} number ({tiny:.8g}, model.dtype), where it becomes 0 or a subnormal and 0/0 "
            f"gives NaN; use at least {need:.8g}")
    if t.epsilon > top:
        raise ConfigError(f"train.epsilon = {t.epsilon:g} is above the largest {dtype} number: {where}")


STATE_SLOTS = {"sgd": 0, "momentum": 1, "nesterov": 1, "adam": 2}  # arrays like the weights each keeps


# ---------------------------------------------------------------------------
# Files and overrides


BUILTIN_CONFIGS = ("default", "logreg", "four-vs-nine", "deep", "accurate")


def builtin_config_text(name: str) -> str:
    return resources.files("mlecli").joinpath("configs", f"{name}.toml").read_text(encoding="utf-8")


def parse_toml(text: str, where: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    except ValueError:  # an integer of more digits than Python converts
        raise ConfigError(f"{where}: not usable TOML: a number has more than 4300 digits") from None
    except RecursionError:
        raise ConfigError(f"{where}: not usable TOML: arrays or tables nested too deeply") from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split `section.key=value`; the value is parsed as TOML, else taken as a plain string."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=3")
    path = key.split(".")
    if any(not p for p in path):
        raise ConfigError(f"--set {item!r}: {key!r} is not a dotted key like train.epochs")
    text = text.strip()
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if text[:1] in "{\"'" or not text:
            raise ConfigError(f"--set {item!r}: {text!r} is not a valid TOML value") from None
        if text[:1] == "[":
            raise ConfigError(
                f"--set {item!r}: {text!r} is not a valid TOML value (a value with spaces must be one quoted "
                f"argument: --set '{key}={text} …')"
            ) from None
        value = text  # a bare word such as fashion-mnist
    except (ValueError, RecursionError):
        raise ConfigError(f"--set {item!r}: the value is too large or nested too deeply") from None
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Return a copy of `raw` with each `--set` applied (validation happens in from_dict).

    A learning rate belongs to the update rule it was written with: when the overrides
    change train.optimizer and none sets train.learning_rate, `raw`'s rate is left out, and
    the new rule trains at its own (DEFAULT_RATES)."""
    out = _overridden(raw, overrides)
    before, after = _train_table(raw), _train_table(out)
    if ("learning_rate" in after and after.get("optimizer", "sgd") != before.get("optimizer", "sgd")
            and not any(_sets_the_rate(item) for item in overrides)):
        positive_float("train.learning_rate", after["learning_rate"])  # a wrong one is refused, not dropped
        out["train"] = {k: v for k, v in after.items() if k != "learning_rate"}
    return out


def _train_table(raw: dict[str, Any]) -> dict[str, Any]:
    train = raw.get("train")
    return train if isinstance(train, dict) else {}


def _sets_the_rate(item: str) -> bool:
    path, value = parse_override(item)
    return path[:2] == ["train", "learning_rate"] or (
        path == ["train"] and isinstance(value, dict) and "learning_rate" in value)


def _overridden(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
            node[part] = child = dict(child)
            node = child
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            value = {**node[path[-1]], **value}  # a table sets the keys it lists, as one --set each would
        node[path[-1]] = value
    return out


STDIN = "-"  # a config path that means standard input (only where the user gave the path: pipe_ok)


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *, pipe_ok: bool = False,
         note: Callable[[str], None] | None = None) -> Config:
    """Load a config file (None = the built-in default) and apply overrides.

    A bare name of a built-in config (default, logreg, four-vs-nine, deep, accurate) that is not
    a file in the current folder loads the copy shipped inside the package. With `pipe_ok`,
    for a path the user gave on the command line, the config may come from a pipe (the shell's
    process substitution `<(...)`, a FIFO) or, for "-", from standard input: anything mlecli
    reads back unasked (a run's config.toml) must be a regular file, which never blocks.
    `note` is told when the learning rate is another than the config says, or far above the
    update rule's own.
    """
    if path is not None and not str(path).strip():
        raise ConfigError(f"config {str(path)!r} is an empty name: give a TOML file, or the name of a built-in config "
                          f"({', '.join(BUILTIN_CONFIGS)})")
    if path is None or (str(path) in BUILTIN_CONFIGS and not Path(path).exists()):
        name = "default" if path is None else str(path)
        where = f"built-in config {name}"
        text = builtin_config_text(name)
    elif pipe_ok and str(path) == STDIN:
        name, where = "stdin", "config from standard input"
        text = _read_stdin(where)
    else:
        p = Path(path)
        where = f"config {p}"
        text, piped = _read_config_file(p, pipe_ok=pipe_ok)
        # /dev/fd/63, the name bash gives a process substitution, says nothing of the config
        name = "pipe" if piped and p.parent.name == "fd" else p.stem
    base = parse_toml(text, where)
    try:
        merged = apply_overrides(base, overrides)
        cfg = from_dict(merged, name=name)
    except ConfigError as exc:
        error = exc
    else:
        for line in _rate_notes(cfg, base, merged, where) if note is not None else ():
            note(line)
        return cfg
    try:
        from_dict(base, name=name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    raise ConfigError(f"--set: {error}") from None  # the config is fine: an override is not


def _rate_notes(cfg: Config, base: dict[str, Any], merged: dict[str, Any], where: str) -> list[str]:
    """What a user should know before the run about its learning rate: that it is the rule's
    own where the config's was written for another rule, and that it is far above the rule's own."""
    t, notes = cfg.train, []
    own = DEFAULT_RATES[t.optimizer]
    written = _train_table(base)
    if "learning_rate" in written and "learning_rate" not in _train_table(merged):
        notes.append(f"note: train.optimizer = {t.optimizer!r} trains at {t.optimizer}'s own learning rate, {own:g}: "
                     f"train.learning_rate = {written['learning_rate']:g} in the {where} is for "
                     f"{written.get('optimizer', 'sgd')} (set train.learning_rate to choose another)")
    elif t.learning_rate >= FAR_FROM_DEFAULT * own:
        notes.append(f"note: train.learning_rate = {t.learning_rate:g} is {t.learning_rate / own:.3g} times "
                     f"{t.optimizer}'s own rate ({own:g}, what it trains at when the rate is not set): if the run "
                     "learns nothing or diverges, try a smaller one")
    return notes


def rate_advice(t: TrainConfig) -> str:
    """What to try when training at t.learning_rate overshot (the run diverged, or its
    log-likelihood or weights stopped being finite): a smaller rate, named."""
    own = DEFAULT_RATES[t.optimizer]
    if t.optimizer == "adam":
        why = "adam, whose step is about η for each weight whatever the batch"
    else:
        boost = (f", and momentum μ = {t.momentum:g} multiplies it by about 1/(1 − μ) = {1 / (1 - t.momentum):.3g}"
                 if t.optimizer != "sgd" and t.momentum > 0 else "")
        why = (f"{t.optimizer} at batches of {t.batch_size} (the step grows with the batch, since the LL is a "
               f"sum{boost})")
    smaller = (f"{own:g}, {t.optimizer}'s own rate" if own <= t.learning_rate / 2  # well below this one
               else f"{t.learning_rate / 10:g}, a tenth of it")
    return (f"train.learning_rate = {t.learning_rate:g} is too large for {why}: start a new run with a smaller one, "
            f"such as {smaller} (--resume cannot change it)")


MAX_CONFIG_BYTES = 1 << 20  # a config is a few hundred bytes; more is not a config


def _read_config_file(p: Path, *, pipe_ok: bool = False) -> tuple[str, bool]:
    """The text of a config file and whether it came from a pipe (only with `pipe_ok`), with a
    hint for what was probably meant when it is not one."""

    try:
        st = p.stat()
    except FileNotFoundError:
        if p.suffix != ".toml" and p.with_name(p.name + ".toml").is_file():
            raise ConfigError(f"config {p} does not exist; did you mean {p.with_name(p.name + '.toml')}?") from None
        raise ConfigError(f"config {p} does not exist (built-in configs: {', '.join(BUILTIN_CONFIGS)})") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        if (p / "checkpoints").is_dir():
            raise ConfigError(f"{p} is a run folder, not a config: to continue it, "
                              f"mlecli train --resume {shlex.quote(str(p))}")
        raise ConfigError(f"config {p} is a folder: give a TOML file, or the name of a built-in config")
    piped = stat.S_ISFIFO(st.st_mode)
    if not stat.S_ISREG(st.st_mode) and not (piped and pipe_ok):
        raise ConfigError(f"config {p} is {'a pipe, which can be read only once' if piped else 'not a regular file'}: "
                          "give a TOML file")
    try:
        # A pipe the user named waits for its writer, as `cat` would: that is what they asked for.
        with open(p, "rb") if piped else open_regular(p) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {p}: {exc.strerror}") from None
    return _decoded(data, f"config {p}"), piped


def _read_stdin(where: str) -> str:
    if sys.stdin is None:  # started with its standard input closed
        raise ConfigError(f"{where}: standard input is closed; give a TOML file")
    stream = getattr(sys.stdin, "buffer", sys.stdin)  # a text stream put in its place has no bytes under it
    try:
        data = stream.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {where}: {exc.strerror or exc}") from None
    return _decoded(data.encode("utf-8", "surrogateescape") if isinstance(data, str) else data, where)


def _decoded(data: bytes, where: str) -> str:
    """`data` read with a limit of one byte more than a config may have, as text."""
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{where} is larger than {MAX_CONFIG_BYTES // 1024} KiB: it is not a config")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where} is not UTF-8 text") from None


# ---------------------------------------------------------------------------
# Writing the resolved config back as TOML


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        # JSON's escapes are valid in a TOML basic string; TOML also forbids a raw DEL.
        return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in sorted(v.items())) + " }"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _toml_key(k: str) -> str:
    return k if k.replace("-", "").replace("_", "").isalnum() else toml_value(k)


def to_toml(cfg: Config) -> str:
    """The fully resolved config as TOML text that `load` reads back to an equal Config."""
    d = cfg.to_dict()
    lines = [f"name = {toml_value(d.pop('name'))}"]
    for section, values in d.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"
