"""A sweep's record: its folder and `sweep.json` (the grid, the seeds, the base config, the
runs), read and checked in one place, and what each listed run's config must be.

```
<sweep dir>/sweep.json                       the grid, the seeds, the base config, the runs
<sweep dir>/<key=value,...,seed=S>/          one ordinary run folder per grid point and seed
<sweep dir>/.lock                            held while a sweep works in the folder
```

Read by the sweep itself (runner.py), by `mlecli runs` (runs.py) and by the compare
table and picture (compare.py), so that all three agree on what a sweep is.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mlecli.run import config as config_mod
from mlecli.run.config import Config
from mlecli.run.rundir import unique_folder
from mlecli.safe import schema
from mlecli.safe.errors import MlecliError
from mlecli.safe.files import atomic_write_text, is_temporary_name
from mlecli.safe.schema import SchemaError
from mlecli.sweep.grid import SEED_KEYS, Plan, config_keys, format_seeds, jsonable, planned_runs, show
from mlecli.version import __version__

SWEEP_FORMAT = 1


def default_sweep_dir(name: str, root: Path = Path("runs"), create: bool = True) -> Path:
    """`runs/<name>-sweep-<timestamp>` (then `-2`, `-3`, … if taken), made with one
    exclusive mkdir (unless `create` is False), so two sweeps never get the same folder."""

    return unique_folder(root, f"{name}-sweep", option="--sweep-dir", create=create)


def read_sweep_json(sweep_dir: Path) -> dict[str, Any] | None:
    """sweep.json of a folder, checked (schema.SWEEP); None if there is none. The one place
    it is read: anything damaged in it is one line naming the file and the key."""

    path = Path(sweep_dir) / "sweep.json"
    if not path.exists() and not path.is_symlink():
        return None
    data = schema.read_json(path, schema.SWEEP)
    _check_runs(data, path)
    return data


def _check_runs(data: dict[str, Any], path: Path) -> None:
    """sweep.json's runs must be the ones its grid and seeds make (as write_sweep_json wrote
    them): an emptied or edited list would have sweep, runs and plot disagree on what the
    sweep is."""

    n = len(data["seeds"])
    for g in data["grid"]:
        n *= len(g["values"])
        if n > len(data["runs"]):  # known short before listing the runs a damaged grid would make
            break
    why = None
    if not data["runs"]:
        why = "runs lists no run; a sweep has at least one"
    elif n != len(data["runs"]):
        why = f"runs lists {len(data['runs'])} runs, its grid and seeds make {n}{'+' if n > len(data['runs']) else ''}"
    else:
        want = planned_runs(data["grid"], data["seeds"])
        bad = next((i for i, (a, b) in enumerate(zip(data["runs"], want)) if _jsonkey(a) != _jsonkey(b)), None)
        if bad is not None:
            why = f"runs[{bad}] is not the run its grid and seeds make there ({want[bad]['dir']})"
    if why:
        raise SchemaError(f"{path}: {why}; the file is damaged or not mlecli's")


def _jsonkey(value: Any) -> str:
    """Equal for the same JSON (1 and 1.0, true and 1 differ)."""
    return json.dumps({k: value.get(k) for k in ("dir", "point", "seed")}, sort_keys=True)


def expected_configs(sweep_dir: Path, data: dict[str, Any]) -> dict[Path, Config | None]:
    """Each run folder a sweep.json lists, and the config its run must have (its grid
    point's values and its seed in the base config; None where that is not a valid config)."""

    out: dict[Path, Config | None] = {}
    for entry in data["runs"]:
        raw = json.loads(json.dumps(data["base_config"]))
        for key, value in [*entry["point"].items(), *((k, entry["seed"]) for k in SEED_KEYS)]:
            *sections, leaf = key.split(".")  # as --set puts a value in (config.apply_overrides)
            node = raw
            for part in sections:
                child = dict(node[part]) if isinstance(node.get(part), dict) else {}
                node[part] = child
                node = child
            node[leaf] = value
        try:
            out[Path(sweep_dir) / entry["dir"]] = config_mod.from_dict(raw, name=str(raw.get("name", "run")))
        except MlecliError:
            out[Path(sweep_dir) / entry["dir"]] = None
    return out


def find_sweep(p: Plan, root: Path = Path("runs")) -> Path | None:
    """The newest sweep folder under `root` made by this very sweep (same config, grid and seeds)."""
    if not root.is_dir():
        return None
    want = p.description()
    for folder in sorted(root.glob(f"{glob_escape(p.base.name)}-sweep-*"), key=lambda f: f.name, reverse=True):
        try:
            data = read_sweep_json(folder)
        except MlecliError:
            continue
        if data is not None and _described(data) == want:
            return folder
    return None


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _described(data: dict[str, Any]) -> dict[str, Any]:
    return {k: data.get(k) for k in ("base_config", "grid", "seeds")}


def check_sweep_dir(p: Plan, sweep_dir: Path) -> bool:
    """True if `sweep_dir` already holds this sweep; False if it is new or empty. Raises
    MlecliError if it holds another sweep, or things that are not this sweep's runs."""
    data = read_sweep_json(sweep_dir)
    if data is not None:
        if _described(data) != p.description():
            raise MlecliError(
                f"sweep folder {sweep_dir} holds another sweep ({_difference(data, p)}); choose another "
                f"--sweep-dir, or repeat the command that made it ({sweep_dir / 'sweep.json'} describes it)"
            )
        return True
    if not sweep_dir.exists():
        return False
    if not sweep_dir.is_dir():
        raise MlecliError(f"--sweep-dir {sweep_dir} is a file; give a folder")
    names = {r.name for r in p.runs} | {".lock"}
    strangers = sorted(c.name for c in sweep_dir.iterdir() if c.name not in names and not is_temporary_name(c.name))
    if strangers:
        raise MlecliError(
            f"sweep folder {sweep_dir} already holds {', '.join(strangers[:3])}{' ...' if len(strangers) > 3 else ''} "
            "and no sweep.json; choose another --sweep-dir"
        )
    return any(c.name in names - {".lock"} for c in sweep_dir.iterdir())


def _difference(data: dict[str, Any], p: Plan) -> str:
    want = p.description()
    if data.get("grid") != want["grid"]:
        had = " ".join(f"{g['key']}={','.join(map(show, g['values']))}" for g in data.get("grid") or []) or "none"
        return f"its grid is {had}"
    if data.get("seeds") != want["seeds"]:
        return f"its seeds are {format_seeds(tuple(data.get('seeds') or ()))}"
    had, now = config_keys(data.get("base_config") or {}), config_keys(want["base_config"])
    keys = sorted(k for k in had.keys() | now.keys() if had.get(k) != now.get(k))
    return "its config differs in " + ", ".join(f"{k} ({show(had.get(k))} there)" for k in keys[:3])


def write_sweep_json(p: Plan, sweep_dir: Path, blas_threads: int, created: str | None = None) -> None:
    data = {
        "format": SWEEP_FORMAT,
        "mlecli": __version__,
        "created": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": p.source,
        "set": list(p.sets),
        **p.description(),
        "blas_threads": blas_threads,
        "runs": [{"dir": r.name, "point": {k: v for k, v in r.point}, "seed": r.seed} for r in p.runs],
    }
    atomic_write_text(Path(sweep_dir) / "sweep.json", json.dumps(jsonable(data), indent=2) + "\n")


def config_difference(have: Config, want: Config) -> str | None:
    """The first config key in which a run folder's run differs from the sweep's run, in
    words (`train.epochs is 1, not 2 as the sweep says`); None if they agree (the name,
    which trains nothing, may differ)."""
    a, b = config_keys(have.to_dict()), config_keys(want.to_dict())
    for key in sorted(a.keys() | b.keys()):
        if key != "name" and (type(a.get(key)), a.get(key)) != (type(b.get(key)), b.get(key)):
            return f"{key} is {show(a.get(key)) if key in a else 'not set'}, not {show(b.get(key))} as the sweep says"
    return None

