"""Planning a sweep: the grid (`--grid KEY=V1,V2,...`), the seeds (`--seeds 0-4`), and
one run per grid point and seed, each with its folder name and its config, checked like
`--set` before anything starts; and the `mlecli train` command of each run (`--dry-run`).
Carrying a plan out is mlecli/sweep/runner.py's job.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlecli.nn.step import blas_threads as trainer_threads
from mlecli.run import config as config_mod
from mlecli.run.config import Config
from mlecli.safe.errors import ConfigError, quoted

SEED_KEYS = ("model.seed", "train.seed")
MAX_SEEDS = 10_000
MAX_RUNS = 10_000  # grid points x seeds: refused beyond, before the grid is expanded
MAX_NAME_BYTES = 128  # a run folder's name; longer ones end in a hash (file systems allow 255)


# ---------------------------------------------------------------------------
# The command line's pieces: --grid KEY=V1,V2,... and --seeds 0-4


@dataclass(frozen=True)
class Axis:
    """One `--grid`: a config key and its values, each as typed (a TOML value, as `--set`
    takes it) and parsed."""

    key: str
    items: tuple[str, ...]
    values: tuple[Any, ...]


def split_values(text: str) -> list[str]:
    """Split V1,V2,... at the commas outside brackets, braces and quotes; ValueError for a
    bracket, brace or quote that is never closed, or closes nothing."""
    items, stack, quote, start, i = [], [], None, 0, 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in "[{":
            stack.append(c)
        elif c in "]}":
            if not stack or stack.pop() != "[{"["]}".index(c)]:
                raise ValueError(f"a {c!r} closes nothing")
        elif c == "," and not stack:
            items.append(text[start:i])
            start = i + 1
        i += 1
    if quote or stack:
        raise ValueError(f"a {quote or stack[-1]!r} is never closed")
    items.append(text[start:])
    return [item.strip() for item in items]


def parse_grid(text: str) -> Axis:
    """`KEY=V1,V2,...` into an Axis; raises ConfigError for a malformed one."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,..., e.g. --grid train.learning_rate=0.01,0.05")
    try:
        items = split_values(rest)
    except ValueError as exc:
        advice = ("; a value with spaces must be inside one quoted argument, e.g. --grid 'model.hidden=[64, 32],[128]'"
                  if "never closed" in str(exc) else "")
        raise ConfigError(f"--grid {text!r}: {exc}{advice}") from None
    if any(not item for item in items):
        raise ConfigError(f"--grid {text!r}: an empty value (two commas in a row, or one at an end)")
    if len(items) > MAX_RUNS:
        raise ConfigError(f"--grid {text!r}: {len(items):,} values; a sweep takes at most {MAX_RUNS:,} runs")
    values, seen = [], {}
    for item in items:
        try:
            path, value = config_mod.parse_override(f"{key}={item}")
        except ConfigError as exc:  # its words are --set's: say them as the grid's
            why = str(exc).removeprefix(f"--set {f'{key}={item}'!r}: ")
            why = re.sub(r" \(a value with spaces must be one quoted argument: .*\)$", "", why)
            raise ConfigError(f"--grid {text!r}: {why}") from None
        same = seen.setdefault(_identity(value), item)
        if same is not item:
            raise ConfigError(f"--grid {'.'.join(path)}: {same} and {item} are the same value; give each value once")
        values.append(value)
    return Axis(".".join(path), tuple(items), tuple(values))


def _identity(value: Any) -> str:
    """Equal for two values of one type that are equal (1 and 1.0 differ, as do true and 1)."""
    def tag(v: Any) -> Any:
        if isinstance(v, dict):
            return ["dict", sorted([k, tag(x)] for k, x in v.items())]
        if isinstance(v, (list, tuple)):
            return ["list", [tag(x) for x in v]]
        return [type(v).__name__, v if not isinstance(v, float) else repr(v)]

    return json.dumps(tag(value), default=str)


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0-4`, `0,3,7` or a mix (`0-2,10`) into seeds, in the order given; each once."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"--seeds {quoted(text)}: {part.strip()!r} is not a seed (0, 1, ...) or a range "
                              "such as 0-4")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi >= config_mod.BIG:
            raise ConfigError(f"--seeds {quoted(text)}: a seed must be below 2**63")
        if hi < lo:
            raise ConfigError(f"--seeds {quoted(text)}: the range {lo}-{hi} runs backwards; write {hi}-{lo}")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise ConfigError(f"--seeds {quoted(text)}: more than {MAX_SEEDS:,} seeds; a sweep takes at most that many")
        seeds.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for s in seeds:
        if s in seen:
            raise ConfigError(f"--seeds {quoted(text)} lists seed {s} twice")
        seen.add(s)
    return tuple(seeds)


def format_seeds(seeds: tuple[int, ...]) -> str:
    """The shortest --seeds text for `seeds` (0,1,2,3,7 → 0-3,7)."""
    parts, i = [], 0
    while i < len(seeds):
        j = i
        while j + 1 < len(seeds) and seeds[j + 1] == seeds[j] + 1:
            j += 1
        parts.append(str(seeds[i]) if j == i else f"{seeds[i]}-{seeds[j]}")
        i = j + 1
    return ",".join(parts)


def show(value: Any) -> str:
    """A grid value as people write it: 0.05, [64, 32], fashion-mnist."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


# ---------------------------------------------------------------------------
# The plan: every run of the sweep, its folder and its config


@dataclass(frozen=True)
class RunSpec:
    """One run: its folder's name, its grid point (the index of each axis's value, and the
    values), its seed and its config."""

    name: str
    index: tuple[int, ...]  # which value of each axis: what identifies the grid point
    point: tuple[tuple[str, Any], ...]  # (key, value) for each axis
    items: tuple[str, ...]  # KEY=VALUE for each axis, the value as typed
    seed: int
    config: Config

    @property
    def overrides(self) -> tuple[str, ...]:
        return (*self.items, *(f"{k}={self.seed}" for k in SEED_KEYS))

    def label(self) -> str:
        return ", ".join(f"{_short(k)}={show(v)}" for k, v in self.point) or "the config"


@dataclass(frozen=True)
class Plan:
    source: str | None  # CONFIG as given (a file or a built-in name), None = default
    sets: tuple[str, ...]
    axes: tuple[Axis, ...]
    seeds: tuple[int, ...]
    base: Config  # the config with --set applied, before any grid value or seed
    runs: tuple[RunSpec, ...]  # grid points in order, each with every seed

    def points(self) -> list[tuple[tuple[str, Any], ...]]:
        """The grid points in order, each once. A point is told by its indices, never by
        its values (a list or a table cannot be a dict key)."""
        first = {}
        for r in self.runs:
            first.setdefault(r.index, r.point)
        return list(first.values())

    def runs_of(self) -> list[list[RunSpec]]:
        """The runs of each grid point (as `points` orders them)."""
        groups: dict[tuple[int, ...], list[RunSpec]] = {}
        for r in self.runs:
            groups.setdefault(r.index, []).append(r)
        return list(groups.values())

    def description(self) -> dict[str, Any]:
        """What makes two sweeps the same sweep (not where they came from)."""
        return jsonable({
            "base_config": self.base.to_dict(),
            "grid": [{"key": a.key, "values": list(a.values)} for a in self.axes],
            "seeds": list(self.seeds),
        })

    def order(self) -> list[RunSpec]:
        """Runs in the order to start them: every grid point's first seed, then the second
        seed of each..., so that the first results already span the grid."""
        position = {s: i for i, s in enumerate(self.seeds)}
        return sorted(self.runs, key=lambda r: position[r.seed])  # stable: grid points in order


def _cut(text: str, limit: int = 40) -> str:
    """A value as typed, for a message: cut to `limit` characters."""
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def config_keys(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config's dict by dotted key (`train.learning_rate`): sections opened one level,
    values (lists and tables included) kept whole."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not prefix:
            out.update(config_keys(v, f"{k}."))
        else:
            out[prefix + k] = v
    return out


def size(axes: list[Axis] | tuple[Axis, ...], seeds: tuple[int, ...]) -> int:
    """The number of runs: the product of the axes' sizes, times the seeds."""
    return math.prod(len(a.values) for a in axes) * len(seeds)


def keys_set(path: list[str], value: Any) -> list[tuple[str, Any]]:
    """The config keys an override sets, with their values: a table given to a whole
    section (`--set 'train={epochs=1, learning_rate=0.3}'`) sets each key it lists."""
    key = ".".join(path)
    if len(path) == 1 and path[0] in config_mod.SCHEMA and isinstance(value, dict):
        return [(f"{key}.{k}", v) for k, v in value.items()]
    return [(key, value)]


def plan(source: str | None, sets: tuple[str, ...], grids: tuple[str, ...], seeds: tuple[int, ...]) -> Plan:
    """Check everything and list the runs; raises ConfigError before anything starts."""
    base = config_mod.load(source, sets)
    owner: dict[str, str] = {}  # config key → the option that sets it
    for item in sets:
        path, value = config_mod.parse_override(item)
        for key, _ in keys_set(path, value):
            said = f"--set {'.'.join(path)}"
            if key in SEED_KEYS:
                raise ConfigError(f"{said}: a sweep sets model.seed and train.seed from --seeds; drop the --set"
                                  if said == f"--set {key}" else
                                  f"{said} sets {key}: a sweep sets model.seed and train.seed from --seeds; "
                                  f"drop {key} from the table")
            owner[key] = said
    axes: list[Axis] = []
    for text in grids:
        axis = parse_grid(text)
        said = f"--grid {axis.key}"
        if axis.key == "name":
            raise ConfigError("--grid name: the run name cannot vary within a sweep; use --set name=...")
        if any(a.key == axis.key for a in axes):
            raise ConfigError(f"--grid {axis.key} is given twice; list all its values in one --grid")
        keys = dict.fromkeys(k for v in axis.values for k, _ in keys_set(axis.key.split("."), v))
        for key in keys:
            if key in SEED_KEYS:
                raise ConfigError(f"{said}: a sweep sets model.seed and train.seed from --seeds; use --seeds"
                                  if key == axis.key else
                                  f"{said} sets {key}: a sweep sets model.seed and train.seed from --seeds; "
                                  f"drop {key} from the tables and use --seeds")
            if key in owner:
                other = owner[key]
                raise ConfigError(f"{said} and {other} both set it; keep one" if other.endswith(f" {key}") and
                                  key == axis.key else f"{said} and {other} both set {key}; keep one")
            owner[key] = said
        alone: dict[str, str] = {}  # each value alone first: the error names that value
        for item in axis.items:
            cfg = _checked(base, (*sets, f"{axis.key}={item}"), f"--grid {axis.key}={_cut(item)}")
            same = alone.setdefault(json.dumps(cfg.to_dict(), sort_keys=True), item)
            if same is not item:
                raise ConfigError(f"--grid {axis.key}: {same} and {item} give the same config; give each value once")
        axes.append(axis)
    n = size(axes, seeds)
    if n > MAX_RUNS:
        sizes = " x ".join([*(f"{len(a.values):,}" for a in axes), f"{len(seeds):,} seeds"])
        raise ConfigError(f"the grid is {sizes} = {n:,} runs; a sweep takes at most {MAX_RUNS:,}: split it into "
                          "smaller sweeps")
    runs = []
    names = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        point = tuple((a.key, a.values[i]) for a, i in zip(axes, combo))
        items = tuple(f"{a.key}={a.items[i]}" for a, i in zip(axes, combo))
        for seed in seeds:
            overrides = (*items, *(f"{k}={seed}" for k in SEED_KEYS))
            where = "--grid " + ", ".join(items) if items else "--seeds"
            cfg = _checked(base, (*sets, *overrides), where)
            _check_kept(cfg, sets, items, seed, where)
            runs.append(RunSpec("", combo, point, items, seed, cfg))
    names = run_names([(r.point, r.seed) for r in runs])
    runs = [RunSpec(n, r.index, r.point, r.items, r.seed, r.config) for n, r in zip(names, runs)]
    return Plan(source, tuple(sets), tuple(axes), tuple(seeds), base, tuple(runs))


def _checked(base: Config, overrides: tuple[str, ...], where: str) -> Config:
    """A run's config: the --sets again with the grid point's items, as its `mlecli train`
    command gives them (a learning rate set by --set stays when the grid changes the rule)."""
    try:
        return config_mod.from_dict(config_mod.apply_overrides(base.to_dict(), overrides), name=base.name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _check_kept(cfg: Config, sets: tuple[str, ...], items: tuple[str, ...], seed: int, where: str) -> None:
    """Every value the --sets, the grid point and the seed give is in the run's config: a
    table given to a whole section replaces that section, and would silently undo a key
    set before it."""
    have = cfg.to_dict()
    wanted = [(option, key, value) for option, group in (("--set", sets), ("--grid", items)) for item in group
              for key, value in keys_set(*config_mod.parse_override(item))]
    wanted += [("--seeds", key, seed) for key in SEED_KEYS]
    for option, key, value in wanted:
        section, _, sub = key.partition(".")
        now = have.get(section, {}).get(sub) if sub else have.get(section)
        if now != value:
            raise ConfigError(f"{where}: {key} ends up {show(now)}, not {show(value)} as {option} gives it; "
                              f"set it with one option only ({option} {key}=...)")


def run_names(runs: list[tuple[tuple[tuple[str, Any], ...], int]]) -> list[str]:
    """The folder name of each (grid point, seed), in order: folder_name's, numbered when
    two values look alike in a file name."""
    names = [folder_name(point, seed) for point, seed in runs]
    if len(set(names)) != len(names):
        width = len(str(len(names)))
        names = [f"{i:0{width}d}-{n}" for i, n in enumerate(names, start=1)]
    return names


def planned_runs(grid: list[dict[str, Any]], seeds: list[int]) -> list[dict[str, Any]]:
    """The `runs` of sweep.json for its `grid` and `seeds` ([{"key", "values"}], as
    sweep.json holds them): what `plan` makes, each {"dir", "point", "seed"}, in order."""
    pairs = [(tuple((g["key"], g["values"][i]) for g, i in zip(grid, combo)), seed)
             for combo in itertools.product(*(range(len(g["values"])) for g in grid)) for seed in seeds]
    return jsonable([{"dir": name, "point": dict(point), "seed": seed}
                     for name, (point, seed) in zip(run_names(pairs), pairs)])


def folder_name(point: tuple[tuple[str, Any], ...], seed: int) -> str:
    """The run folder's name: `key=value,...,seed=S`, at most MAX_NAME_BYTES bytes; a
    longer one is cut and ends in a hash of the grid point (the same point, the same
    name), so that every name fits in any file system."""
    parts = [f"{_short(k)}={_name_part(v)}" for k, v in point]
    name = ",".join([*parts, f"seed={seed}"])
    if len(name.encode()) <= MAX_NAME_BYTES:
        return name
    digest = hashlib.sha256(json.dumps(jsonable(point), sort_keys=True).encode()).hexdigest()[:12]
    tail = f"~{digest},seed={seed}"
    head = ",".join(parts).encode()[: MAX_NAME_BYTES - len(tail)].decode("utf-8", "ignore")
    return head + tail


def _name_part(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_name_part(v) for v in value) or "none"
    text = show(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


# ---------------------------------------------------------------------------
# --dry-run: the `mlecli train` command of each run


def train_commands(p: Plan, sweep_dir: Path, data_dir: Path | None, blas_threads: int) -> Iterator[str]:
    """One shell command per run, in start order, each made as it is asked for. A run
    whose batches exceed 64 gets the sweep's BLAS thread count, which its last bits
    depend on."""

    for r in p.order():
        words = ["mlecli", "train"] + ([p.source] if p.source is not None else [])
        for item in (*p.sets, *r.overrides):
            words += ["--set", item]
        words += ["--run-dir", str(Path(sweep_dir) / r.name)]
        if data_dir is not None:
            words += ["--data-dir", str(data_dir)]
        env = f"OPENBLAS_NUM_THREADS={blas_threads} " if trainer_threads(r.config.train.batch_size) is None else ""
        yield env + shlex.join(words)


def command(p: Plan, sweep_dir: Path | None, extra: tuple[str, ...] = ()) -> str:
    """The `mlecli sweep` command that makes (or continues) this sweep."""
    words = ["mlecli", "sweep"] + ([p.source] if p.source is not None else [])
    for a in p.axes:
        words += ["--grid", f"{a.key}={','.join(a.items)}"]
    for item in p.sets:
        words += ["--set", item]
    words += ["--seeds", format_seeds(p.seeds), *extra]
    if sweep_dir is not None:
        words += ["--sweep-dir", str(sweep_dir)]
    return shlex.join(words)
