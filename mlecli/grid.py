"""Planning a sweep: the grid (`--grid KEY=V1,V2,...`), the seeds (`--seeds 0-4`), and
one run per grid point and seed, each with its folder name and its config, checked like
`--set` before anything starts; and the `mlecli train` command of each run (`--dry-run`).
Carrying a plan out is mlecli/sweep.py's job.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlecli import config as config_mod
from mlecli.config import Config
from mlecli.errors import ConfigError

SEED_KEYS = ("model.seed", "train.seed")
MAX_SEEDS = 10_000


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
    """Split V1,V2,... at the commas outside brackets, braces and quotes."""
    items, depth, quote, start, i = [], 0, None, 0, 0
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
            depth += 1
        elif c in "]}":
            depth -= 1
        elif c == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
        i += 1
    items.append(text[start:])
    return [item.strip() for item in items]


def parse_grid(text: str) -> Axis:
    """`KEY=V1,V2,...` into an Axis; raises ConfigError for a malformed one."""
    key, sep, rest = text.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,..., e.g. --grid train.learning_rate=0.01,0.05")
    items = split_values(rest)
    if any(not item for item in items):
        raise ConfigError(f"--grid {text!r}: an empty value (two commas in a row, or one at an end)")
    values = []
    for item in items:
        path, value = config_mod.parse_override(f"{key}={item}")
        values.append(value)
    key = ".".join(path)
    for a, b in itertools.combinations(range(len(values)), 2):
        if _same(values[a], values[b]):
            raise ConfigError(f"--grid {key}: {items[a]} and {items[b]} are the same value; give each value once")
    return Axis(key, tuple(items), tuple(values))


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0-4`, `0,3,7` or a mix (`0-2,10`) into seeds, in the order given; each once."""
    seeds: list[int] = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ConfigError(f"--seeds {text!r}: {part.strip()!r} is not a seed (0, 1, ...) or a range such as 0-4")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"--seeds {text!r}: the range {lo}-{hi} runs backwards; write {hi}-{lo}")
        if len(seeds) + hi - lo + 1 > MAX_SEEDS:
            raise ConfigError(f"--seeds {text!r}: more than {MAX_SEEDS:,} seeds; a sweep takes at most that many")
        seeds.extend(range(lo, hi + 1))
    seen: set[int] = set()
    for s in seeds:
        if s in seen:
            raise ConfigError(f"--seeds {text!r} lists seed {s} twice")
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
    """One run: its folder's name, its grid point, its seed and its config."""

    name: str
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
        return list(dict.fromkeys(r.point for r in self.runs))

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
        by_seed = {s: [r for r in self.runs if r.seed == s] for s in self.seeds}
        return [r for s in self.seeds for r in by_seed[s]]


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def plan(source: str | None, sets: tuple[str, ...], grids: tuple[str, ...], seeds: tuple[int, ...]) -> Plan:
    """Check everything and list the runs; raises ConfigError before anything starts."""
    base = config_mod.load(source, sets)
    set_keys = {".".join(config_mod.parse_override(item)[0]) for item in sets}
    for key in sorted(set_keys & set(SEED_KEYS)):
        raise ConfigError(f"--set {key}: a sweep sets model.seed and train.seed from --seeds; drop the --set")
    axes: list[Axis] = []
    for text in grids:
        axis = parse_grid(text)
        if axis.key in SEED_KEYS:
            raise ConfigError(f"--grid {axis.key}: a sweep sets model.seed and train.seed from --seeds; use --seeds")
        if axis.key == "name":
            raise ConfigError("--grid name: the run name cannot vary within a sweep; use --set name=...")
        if axis.key in set_keys:
            raise ConfigError(f"--grid {axis.key} and --set {axis.key} both set it; keep one")
        if any(a.key == axis.key for a in axes):
            raise ConfigError(f"--grid {axis.key} is given twice; list all its values in one --grid")
        alone = {}  # each value alone first: the error names that value
        for item in axis.items:
            cfg = _checked(base, (f"{axis.key}={item}",), f"--grid {axis.key}={item}")
            same = next((other for other, c in alone.items() if c == cfg), None)
            if same is not None:
                raise ConfigError(f"--grid {axis.key}: {same} and {item} give the same config; give each value once")
            alone[item] = cfg
        axes.append(axis)
    runs = []
    names = []
    for combo in itertools.product(*(range(len(a.values)) for a in axes)):
        point = tuple((a.key, a.values[i]) for a, i in zip(axes, combo))
        items = tuple(f"{a.key}={a.items[i]}" for a, i in zip(axes, combo))
        for seed in seeds:
            overrides = (*items, *(f"{k}={seed}" for k in SEED_KEYS))
            cfg = _checked(base, overrides, "--grid " + ", ".join(items) if items else "--seeds")
            names.append(_folder_name(point, seed))
            runs.append(RunSpec("", point, items, seed, cfg))
    if len(set(names)) != len(names):  # values that look alike in a file name
        width = len(str(len(names)))
        names = [f"{i:0{width}d}-{n}" for i, n in enumerate(names, start=1)]
    runs = [RunSpec(n, r.point, r.items, r.seed, r.config) for n, r in zip(names, runs)]
    return Plan(source, tuple(sets), tuple(axes), tuple(seeds), base, tuple(runs))


def _checked(base: Config, overrides: tuple[str, ...], where: str) -> Config:
    try:
        return config_mod.from_dict(config_mod.apply_overrides(base.to_dict(), overrides), name=base.name)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _folder_name(point: tuple[tuple[str, Any], ...], seed: int) -> str:
    parts = [f"{_short(k)}={_name_part(v)}" for k, v in point]
    return ",".join([*parts, f"seed={seed}"])


def _name_part(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "x".join(_name_part(v) for v in value) or "none"
    text = show(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


# ---------------------------------------------------------------------------
# --dry-run: the `mlecli train` command of each run


def train_commands(p: Plan, sweep_dir: Path, data_dir: Path | None, blas_threads: int) -> list[str]:
    """One shell command per run, in start order. A run whose batches exceed 64 gets the
    sweep's BLAS thread count, which its last bits depend on."""
    from mlecli.step import blas_threads as trainer_threads

    lines = []
    for r in p.order():
        words = ["mlecli", "train"] + ([p.source] if p.source is not None else [])
        for item in (*p.sets, *r.overrides):
            words += ["--set", item]
        words += ["--run-dir", str(Path(sweep_dir) / r.name)]
        if data_dir is not None:
            words += ["--data-dir", str(data_dir)]
        env = f"OPENBLAS_NUM_THREADS={blas_threads} " if trainer_threads(r.config.train.batch_size) is None else ""
        lines.append(env + shlex.join(words))
    return lines


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
