"""Checkpoints: the weights plus everything needed to resume exactly, in one .npz.

Arrays `W1, b1, …, W{L+1}, b{L+1}` (the last pair is the output layer), the update
rule's state as arrays named `opt.…`, and `meta`, a 0-d unicode array holding JSON:
format version, resolved config, epochs done, step, position in the epoch, RNG state,
best score. Format 2 holds no wall-clock time at an epoch's end and is written with
fixed zip timestamps, so a checkpoint is a pure function of the training state: the
same state gives the same bytes (a resumed run ends in files identical to an
uninterrupted one). Format 1 (mlecli 0.1: the metrics history inside, no `opt.`
arrays) still loads.

Written to a temporary file, flushed and renamed over the old one; read with
allow_pickle=False, so opening a checkpoint never executes code. A checkpoint that
does not match its own config is refused whole.
"""

from __future__ import annotations

import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlecli.nn.model import Params, layer_sizes
from mlecli.run import config as config_mod
from mlecli.safe import npz, schema
from mlecli.safe.errors import CheckpointError, ConfigError
from mlecli.safe.files import atomic_write_bytes

FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
CHECKPOINT_RE = re.compile(r"^(last|best|epoch-\d{4,})\.npz$")
EXTRA_PREFIXES = ("opt.", "loop.")  # the update rule's state; the loop's (logits not yet measured)


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    params: Params
    meta: dict[str, Any]
    config: Any  # mlecli.run.config.Config, parsed from meta["config"]
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # the `opt.` and `loop.` arrays

    @property
    def epoch(self) -> int:
        return int(self.meta["epochs_done"])

    @property
    def format(self) -> int:
        return int(self.meta["format"])


def encode(params: Params, meta: dict[str, Any], extra: dict[str, np.ndarray] | None = None) -> bytes:
    """The bytes of a checkpoint (format 2): the same arguments always give the same bytes."""
    arrays: dict[str, np.ndarray] = {}
    for i, (W, b) in enumerate(params, start=1):
        arrays[f"W{i}"] = W
        arrays[f"b{i}"] = b
    for name, arr in (extra or {}).items():
        if not name.startswith(EXTRA_PREFIXES):
            raise ValueError(f"extra checkpoint array {name!r} must start with one of {EXTRA_PREFIXES}")
        arrays[name] = arr
    arrays["meta"] = np.array(json.dumps({"format": FORMAT_VERSION, **meta}, sort_keys=True, allow_nan=False))
    return npz.encode(arrays)


def save(path: Path, params: Params, meta: dict[str, Any], extra: dict[str, np.ndarray] | None = None) -> bytes:
    """Write a checkpoint atomically; return its bytes (for copies of it)."""
    data = encode(params, meta, extra)
    atomic_write_bytes(path, data)
    return data


def load(path: Path) -> Checkpoint:
    """Read and check a checkpoint; raise CheckpointError naming the file if it is unusable."""

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        arrays = npz.read(path, check_crc=True)
    except npz.ObjectArrayError:
        raise CheckpointError(
            f"{path} holds Python objects that would need pickle to load; refused (checkpoints are arrays only)"
        ) from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint ({exc})") from None
    meta_arr = arrays.pop("meta", None)
    if meta_arr is None:
        raise CheckpointError(f"{path} is not an mlecli checkpoint (no meta record)")
    if meta_arr.dtype.kind != "U" or meta_arr.shape != ():
        raise CheckpointError(f"{path}: the meta record is not a JSON string")
    try:
        meta = json.loads(str(meta_arr[()]))
    except (ValueError, RecursionError):
        raise CheckpointError(f"{path}: the meta record is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: the meta record is not a JSON object")
    version = meta.get("format")
    if version not in READABLE_FORMATS or isinstance(version, bool):
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}; this mlecli reads formats "
            f"{', '.join(map(str, READABLE_FORMATS))}: use the mlecli version that wrote it"
        )
    try:
        schema.check(meta, schema.META[version], f"{path}: meta record")
    except schema.SchemaError as exc:
        raise CheckpointError(str(exc)) from None
    shape = meta.get("image_shape")
    if shape is not None and shape[0] * shape[1] != meta["n_inputs"]:  # each field well-formed, the two at odds
        raise CheckpointError(f"{path}: its meta record says {shape[0]}×{shape[1]} images ({shape[0] * shape[1]} "
                              f"pixels) but {meta['n_inputs']} inputs; the checkpoint is damaged")
    try:  # the generator's state, exactly as numpy will take it on resume
        np.random.default_rng().bit_generator.state = meta["rng_state"]
    except (TypeError, ValueError, KeyError, OverflowError):
        raise CheckpointError(f"{path}: meta record: rng_state is not a state of numpy's generator") from None
    raw_cfg, n_inputs = meta["config"], meta["n_inputs"]
    try:
        cfg = config_mod.from_dict(raw_cfg, name=str(raw_cfg.get("name", path.stem)))
    except ConfigError as exc:
        raise CheckpointError(f"{path}: its config is not valid ({exc})") from None
    extra = {k: arrays.pop(k) for k in list(arrays) if k.startswith(EXTRA_PREFIXES)} if version >= 2 else {}
    params = _params_from_arrays(path, arrays, cfg, n_inputs)
    return Checkpoint(path, params, meta, cfg, extra)


def _params_from_arrays(path: Path, arrays: dict[str, np.ndarray], cfg, n_inputs: int) -> Params:
    sizes = layer_sizes(n_inputs, cfg.model.hidden)
    expected = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:]), start=1):
        expected[f"W{i}"] = (fan_in, fan_out)
        expected[f"b{i}"] = (fan_out,)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"{path}: its arrays do not match its config (hidden = {list(cfg.model.hidden)}): "
            f"missing {missing or 'none'}, unexpected {extra or 'none'}"
        )
    dtype = np.dtype(cfg.model.dtype)
    for name, shape in expected.items():
        arr = arrays[name]
        if arr.shape != shape or arr.dtype != dtype:
            raise CheckpointError(
                f"{path}: array {name} is {arr.dtype} {arr.shape}, its config needs {dtype} {shape}"
            )
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(f"{path}: array {name} holds non-finite values")
    n = len(sizes) - 1
    return [(arrays[f"W{i}"], arrays[f"b{i}"]) for i in range(1, n + 1)]


def check_same_data(cp: Checkpoint, dataset_name: str, sha256: dict[str, str], data_dir: Path, advice: str) -> None:
    """Refuse data whose files differ from those `cp` was trained on (by their SHA-256)."""
    trained_on = cp.meta.get("dataset_sha256") or {}
    changed = sorted(role for role in trained_on if trained_on[role] != sha256.get(role))
    if changed:
        first = changed[0]
        raise CheckpointError(
            f"{cp.path} was trained on {dataset_name} files with other hashes than those cached in {data_dir} "
            f"({', '.join(changed)}: trained {trained_on[first][:12]}…, cached {sha256.get(first, '?')[:12]}…); "
            + advice
        )


def epoch_of(path: Path) -> int | None:
    """The epoch an epoch checkpoint's name says (`epoch-10000.npz`: 10000); None for best and last."""
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)[len("epoch-"):]) if m and m.group(1).startswith("epoch-") else None


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The checkpoint files of a run (temporary files never count): best.npz, the epoch
    checkpoints in the order of their epochs, last.npz. By the number, never the text
    (`epoch-10000` comes after `epoch-9999`): this is the one list of a run's checkpoints,
    for every choice and every message."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []

    def order(p: Path) -> tuple[int, int, str]:
        epoch = epoch_of(p)
        return (1, epoch, p.name) if epoch is not None else (0 if p.name == "best.npz" else 2, 0, p.name)

    return sorted((p for p in folder.iterdir() if CHECKPOINT_RE.match(p.name)), key=order)


def resolve(target: Path, which: str = "best") -> Path:
    """A checkpoint file, or a run folder's `best`, `last` or `epoch-N` checkpoint."""
    target = Path(target)
    if target.is_file():
        return target
    if not target.exists():
        raise CheckpointError(f"{target} does not exist: give a run folder or a checkpoint file")
    folder = target / "checkpoints"
    if not folder.is_dir():
        raise CheckpointError(f"{target} is not a run folder (it has no checkpoints/ folder)")
    m = re.fullmatch(r"epoch-0*(\d{1,9})", which, flags=re.ASCII)  # more digits: no run has that many epochs
    if which not in ("best", "last") and m is None:
        raise CheckpointError(f"{which!r} is not a checkpoint of a run: give best, last or epoch-N")
    name = f"epoch-{int(m.group(1)):04d}.npz" if m else f"{which}.npz"
    path = folder / name
    if path.exists() and not path.is_file():
        raise CheckpointError(f"{path} is not a regular file (a folder, device or pipe): put the run's checkpoint "
                              "back, or name another with --checkpoint")
    if not path.is_file():
        have = ", ".join(p.stem for p in checkpoints_in(target)) or "none"
        raise CheckpointError(f"{target} has no {which} checkpoint ({path}); it has: {have}")
    return path
