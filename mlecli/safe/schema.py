"""One check for the JSON mlecli reads back from its own files.

A checkpoint's meta record, a run's manifest, the lines of metrics.jsonl and evaluation
reports are written by mlecli, but read back from a disk anyone can edit, copy half of,
or hand to someone else. Each is checked once, where it is read, against a schema
below; any mismatch is one line naming the file and the key (never a traceback deep in
a command). Keys a schema does not name are allowed and ignored: newer files stay
readable by the checks of older fields.

    check(value, MANIFEST, where="runs/x/manifest.json")  # returns value, or raises SchemaError
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlecli.safe.errors import MlecliError
from mlecli.safe.files import read_regular


class SchemaError(MlecliError):
    """A file mlecli wrote earlier does not hold what mlecli writes."""


def show_int(v: int) -> str:
    """An integer for a message: its digits, or for one past 64 bits how many there are."""
    if v.bit_length() <= 64:
        return str(v)
    return f"an integer of {len(str(v)) if v.bit_length() < 14000 else 'thousands of'} digits"


def is_int(v: Any) -> bool:
    """An integer, and not a bool (JSON's and TOML's true are not 1)."""
    return isinstance(v, int) and not isinstance(v, bool)


def show_value(v: Any, *, toml: bool = False) -> str:
    """A value for a message, integers past 64 bits by their number of digits (show_int).
    Else as JSON, cut to 40 characters (a value read back from mlecli's files), or with
    `toml` as a config's message shows it, in full: strings quoted, true and false, lists
    item by item."""
    if is_int(v):
        return show_int(v)
    if toml:
        if isinstance(v, str):
            return repr(v)
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(show_value(x, toml=True) for x in v) + "]"
        return str(v)
    text = json.dumps(v) if isinstance(v, (dict, list, str, bool)) or v is None else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Spec:
    """What a value must be: `ok(value)` says whether it is, `what` says it in words."""

    what: str
    ok: Callable[[Any], bool]
    fields: dict[str, tuple[Spec, bool]] | None = None  # for objects: name → (spec, required)
    items: Spec | None = None  # for lists and maps: the spec of each element / value


def integer(lo: int | None = None, hi: int | None = None) -> Spec:
    bounds = "" if lo is None and hi is None else f" from {lo}" + ("" if hi is None else f" to {hi}")
    return Spec(f"an integer{bounds}", lambda v: is_int(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def is_number(v: Any, finite: bool = True) -> bool:
    """An int (not a bool) or a float, usable as a float: an integer past float's range
    (10**400 is valid JSON and TOML) is not a number here."""
    if is_int(v):
        return v.bit_length() <= 1023
    return isinstance(v, float) and (not finite or math.isfinite(v))


def number(finite: bool = True) -> Spec:
    return Spec("a finite number" if finite else "a number", lambda v: is_number(v, finite))


def number_in(lo: float | None = None, hi: float | None = None) -> Spec:
    """A finite number from lo to hi (either end open when None)."""
    if lo is not None and hi is not None:
        what = f"a number from {lo:g} to {hi:g}"
    elif lo is not None:
        what = f"a finite number >= {lo:g}"
    else:
        what = f"a finite number <= {hi:g}"
    return Spec(what, lambda v: is_number(v) and (lo is None or v >= lo) and (hi is None or v <= hi))


def string(max_len: int = 10_000) -> Spec:
    return Spec("a string", lambda v: isinstance(v, str) and len(v) <= max_len)


def one_of(*values: Any) -> Spec:
    return Spec(f"one of {', '.join(map(show_value, values))}",
                lambda v: any(v == x and type(v) is type(x) for x in values))


def nullable(spec: Spec) -> Spec:
    return Spec(f"{spec.what} or null", lambda v: v is None or spec.ok(v), spec.fields, spec.items)


def array(of: Spec, length: int | None = None, max_len: int = 10_000_000) -> Spec:
    size = f"{length} items" if length is not None else "items"
    return Spec(f"a list of {size}, each {of.what}",
                lambda v: isinstance(v, list) and (length is None or len(v) == length) and len(v) <= max_len,
                items=of)


def mapping(of: Spec) -> Spec:
    """An object with any keys, each value `of`."""
    return Spec(f"an object whose values are each {of.what}", lambda v: isinstance(v, dict), items=of)


def obj(required: dict[str, Spec] | None = None, optional: dict[str, Spec] | None = None) -> Spec:
    fields = {k: (s, True) for k, s in (required or {}).items()}
    fields.update({k: (s, False) for k, s in (optional or {}).items()})
    return Spec("an object", lambda v: isinstance(v, dict), fields=fields)


ANY = Spec("anything", lambda v: True)
OBJECT = Spec("an object", lambda v: isinstance(v, dict))


def check(value: Any, spec: Spec, where: str, path: str = "") -> Any:
    """Return `value` if it matches `spec`; else raise SchemaError naming `where` and the key."""
    if not spec.ok(value):
        key = f" {path}" if path else ""
        raise SchemaError(f"{where}:{key} is {show_value(value)}, expected {spec.what}; the file is damaged or not "
                          "mlecli's")
    if spec.fields is not None and isinstance(value, dict):
        for name, (sub, required) in spec.fields.items():
            if name in value:
                check(value[name], sub, where, f"{path}.{name}" if path else name)
            elif required:
                raise SchemaError(f"{where}: {f'{path}.' if path else ''}{name} is missing; the file is damaged "
                                  "or not mlecli's")
    if spec.items is not None and isinstance(value, (list, dict)):
        entries = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in entries:
            check(v, spec.items, where, f"{path}[{k!r}]" if isinstance(value, dict) else f"{path}[{k}]")
    return value


def load_json(text: str, spec: Spec, where: str) -> Any:
    """Parse and check one JSON document (numbers and nesting of any size are refused
    with the same one line as any other damage)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        raise SchemaError(f"{where}: not valid JSON; the file is damaged or not mlecli's") from None
    return check(value, spec, where)


MAX_JSON_BYTES = 64 << 20  # a manifest or report is a few kB; more is not mlecli's


def read_json(path: Path, spec: Spec) -> Any:

    try:
        text = read_regular(path, MAX_JSON_BYTES).decode("utf-8")
    except UnicodeDecodeError:
        raise SchemaError(f"{path}: not UTF-8 text; the file is damaged or not mlecli's") from None
    except OSError as exc:
        raise SchemaError(f"cannot read {path}: {exc.strerror or exc}") from None
    return load_json(text, spec, str(path))


# ---------------------------------------------------------------------------
# The files


SHA256 = Spec("64 hex digits",
              lambda v: isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v))
FIGURE = nullable(number())
# What mlecli writes: a share of images, a sum or mean of log-probabilities, a time, a rate
RATE = nullable(number_in(0, 1))
LOG_LIKELIHOOD = nullable(number_in(hi=0))
NON_NEGATIVE = nullable(number_in(lo=0))
MAX_SECONDS = 1e10  # three centuries: a longer time was not measured
SECONDS = nullable(number_in(0, MAX_SECONDS))
COUNT = integer(0)

# log_prior is a log density (above 0 for a narrow prior), log_posterior LL plus it: any finite number
_FIGURES = {"train_ll": LOG_LIKELIHOOD, "train_ll_mean": LOG_LIKELIHOOD, "train_acc": RATE,
            "val_ll_mean": LOG_LIKELIHOOD, "val_acc": RATE, "seconds": SECONDS, "images_per_s": NON_NEGATIVE,
            "lr": NON_NEGATIVE, "log_prior": FIGURE, "log_posterior": FIGURE}

# A metrics.jsonl line: {"kind": "epoch" | "step", ...}; the figures may be null.
RECORD = obj(required={"step": COUNT, "epoch": integer(1)}, optional={"kind": string(64), **_FIGURES})

BEST = obj(
    required={"epoch": COUNT, "key": one_of("val_ll_mean", "train_ll_mean"), "value": number_in(hi=0)},
    optional={"record": obj(optional={"kind": string(64), "epoch": COUNT, "step": COUNT, **_FIGURES})},
)

# How early stopping ended a run (checkpoint meta and the manifest's `ended`)
STOPPED_EARLY = obj(required={"epoch": integer(1), "best_epoch": integer(1), "patience": integer(1)})
# The epoch-end watches of schedule.Watch
WATCH = obj(required={"plateau_scale": number_in(0, 1), "plateau_best": LOG_LIKELIHOOD, "plateau_bad": COUNT,
                      "worse_than_base": COUNT})

_TALLY = {"ll": number_in(hi=0), "correct": COUNT, "seen": COUNT}
PARTIAL = obj(required=_TALLY, optional={"seconds": number_in(0, MAX_SECONDS), "measured": COUNT,
                                         "window": obj(required=_TALLY,
                                                       optional={"seconds": number_in(0, MAX_SECONDS)})})

_META_COMMON = {
    "config": OBJECT,  # checked by config.from_dict
    "n_inputs": integer(1, 1 << 24),
    "epochs_done": COUNT,
    "step": COUNT,
    "batch_in_epoch": COUNT,
    "rng_state": OBJECT,  # checked by handing it to numpy
    "partial": PARTIAL,
    "best": nullable(BEST),
}
_META_OPTIONAL = {
    "image_shape": array(integer(1, 1 << 16), length=2),
    "dataset_sha256": mapping(SHA256),
    "mlecli": string(64),
    "blas": obj(optional={"backend": string(200), "threads": nullable(integer(1))}),
    "watch": WATCH,
    "stopped_early": nullable(STOPPED_EARLY),
}

META = {
    1: obj(required={"format": one_of(1), **_META_COMMON}, optional={**_META_OPTIONAL, "metrics": array(RECORD)}),
    2: obj(required={"format": one_of(2), **_META_COMMON, "dataset_sha256": mapping(SHA256)},
           optional=_META_OPTIONAL),
}

MANIFEST = obj(optional={
    "mlecli": string(64), "numpy": string(64), "python": string(64), "platform": string(500),
    "dataset": string(200), "dataset_sha256": mapping(SHA256), "model_seed": COUNT, "train_seed": COUNT,
    "started": string(64), "resumed": array(OBJECT),
    "ended": obj(required={"status": one_of("finished", "interrupted", "failed")},
                 optional={"at": string(64), "error": nullable(string()), "stopped_early": STOPPED_EARLY}),
    "blas": obj(optional={"backend": string(200), "threads": nullable(integer(1))}),
    "data_dir": string(4096),
})

REPORT = obj(
    required={"split": one_of("test", "validation", "train"), "checkpoint_name": string(200), "epoch": COUNT,
              "accuracy": RATE, "images": COUNT, "task": string(1000)},
    optional={"threshold": number_in(0, 1), "checkpoint_sha256": nullable(SHA256)},
)
REPORT.fields["most_confident_errors"] = (array(obj(
    required={"index": COUNT, "digit": integer(0, 255), "y": one_of(0, 1), "p": number_in(0, 1)}), max_len=1000), True)

# A run folder's name inside a sweep folder: one path component, never a way out of it
FOLDER_NAME = Spec("a folder name (no '/', not '.' or '..')",
                   lambda v: isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\0" not in v
                   and len(v.encode("utf-8", "surrogatepass")) <= 255)

# sweep.json (mlecli/sweep/record.py writes it)
SWEEP = obj(
    required={
        "format": one_of(1),
        "base_config": OBJECT,  # checked by config.from_dict where it is used
        "grid": array(obj(required={"key": string(200), "values": array(ANY, max_len=10_000)}), max_len=100),
        "seeds": array(COUNT, max_len=10_000),
        "runs": array(obj(required={"dir": FOLDER_NAME, "point": OBJECT, "seed": COUNT}), max_len=10_000),
    },
    optional={"mlecli": string(64), "created": string(64), "config": nullable(string(4096)),
              "set": array(string(), max_len=10_000), "blas_threads": integer(1, 4096)},
)
