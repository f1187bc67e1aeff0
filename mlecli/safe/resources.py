"""What this machine has room for (memory and disk), and what a network's training needs:
asked before anything big is allocated or written, or any run folder is created.

Each check is one comparison of what is needed against what is there, and a refusal is
one line saying both. Where the system cannot tell (no /proc, an odd file system), the
check passes and the operation itself reports any failure.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlecli.safe.errors import ConfigError, MlecliError


class NoRoom(MlecliError):
    """Not enough memory or disk for what was asked; trying another mirror would not help."""


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


# A container's memory limit and use (cgroup v2, then v1): a process may have less than the machine.
_CGROUP = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
           ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None  # absent, or "max"


def _cgroup() -> tuple[int, int] | None:
    """(limit, use) of this process's memory cgroup, if it has a limit."""
    for limit_path, use_path in _CGROUP:
        limit = _read_int(limit_path)
        if limit is not None and limit < 1 << 60:
            return limit, _read_int(use_path) or 0
    return None


def physical_memory() -> int | None:
    """Bytes of RAM this process may ever use: the machine's, or its container's limit if lower."""
    try:
        have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    cgroup = _cgroup()
    return min(have, cgroup[0]) if cgroup else have


def available_memory() -> int | None:
    """Bytes that can be allocated now without swapping (Linux's MemAvailable, within the container's limit)."""
    have = None
    try:
        with open("/proc/meminfo", "rb") as f:
            for line in f:
                if line.startswith(b"MemAvailable:"):
                    have = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if have is None:
        try:
            have = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    cgroup = _cgroup()
    return min(have, max(0, cgroup[0] - cgroup[1])) if cgroup else have


def free_space(folder: Path) -> int | None:
    """Bytes free for an unprivileged user on the file system holding `folder` (or its nearest parent)."""
    folder = Path(folder)
    for candidate in (folder, *folder.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def need_space(folder: Path, need: int, what: str) -> None:
    """Refuse `what` unless `folder`'s file system has `need` bytes free."""
    free = free_space(folder)
    if free is not None and need > free:
        raise NoRoom(
            f"{what} needs {fmt_bytes(need)} of free space in {folder}, only {fmt_bytes(free)} is available: "
            "free some space or choose another --data-dir"
        )


def need_memory(need: int, what: str, *, now: bool) -> None:
    """Refuse `what` unless `need` bytes fit in memory: available now (`now`), or at all (the machine's RAM)."""
    have = available_memory() if now else physical_memory()
    if have is not None and need > have:
        kind = "available" if now else "in this machine"
        advice = "close other programs and try again" if now else "it cannot be used on this machine"
        raise NoRoom(f"{what} needs {fmt_bytes(need)} of memory, only {fmt_bytes(have)} is {kind}: {advice}")


# ---------------------------------------------------------------------------
# What a network's training needs


INPUT_SIZE_GUESS = 28 * 28  # for the estimate before the data is loaded


def estimate(hidden: tuple[int, ...], batch_size: int, dtype: str, inputs: int = INPUT_SIZE_GUESS,
             state_slots: int = 0) -> int:
    """Bytes for the weights, a gradient buffer, a best copy, the update rule's state
    (`state_slots` arrays like the weights) and a batch's activations (a lower bound)."""
    sizes = [inputs, *hidden, 1]
    params = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    activations = batch_size * sum(sizes) * 3
    itemsize = 4 if dtype == "float32" else 8
    return ((3 + state_slots) * params + activations) * itemsize


def check_fits(hidden: tuple[int, ...], batch_size: int, dtype: str, inputs: int = INPUT_SIZE_GUESS,
               state_slots: int = 0) -> None:
    """Refuse (ConfigError) a network whose training would need more memory than the machine has."""
    need = estimate(hidden, batch_size, dtype, inputs, state_slots)
    have = physical_memory()
    if have and need > have:
        raise ConfigError(
            f"model.hidden = [{', '.join(map(str, hidden))}] with train.batch_size = {batch_size}: the network "
            f"would need about {fmt_bytes(need)} of memory, more than this machine's "
            f"{fmt_bytes(have)} (for {inputs}-pixel images); use smaller layers or batches"
        )


def checkpoint_bytes(hidden: tuple[int, ...], dtype: str, inputs: int, state_slots: int) -> int:
    """About the size of an epoch's checkpoint: the weights and the update rule's state,
    and room for its JSON record (about 9 KB measured)."""
    sizes = [inputs, *hidden, 1]
    params = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    itemsize = 4 if dtype == "float32" else 8
    return (1 + state_slots) * params * itemsize + (16 << 10)
