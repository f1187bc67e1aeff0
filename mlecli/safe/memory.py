"""Whether a network's training fits in this machine's memory (checked before anything
is allocated or any run folder is created; the probe itself is resources.py's)."""

from __future__ import annotations

from mlecli.safe import resources
from mlecli.safe.errors import ConfigError

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
    have = resources.physical_memory()
    if have and need > have:
        raise ConfigError(
            f"model.hidden = [{', '.join(map(str, hidden))}] with train.batch_size = {batch_size}: the network "
            f"would need about {resources.fmt_bytes(need)} of memory, more than this machine's "
            f"{resources.fmt_bytes(have)} (for {inputs}-pixel images); use smaller layers or batches"
        )


def checkpoint_bytes(hidden: tuple[int, ...], dtype: str, inputs: int, state_slots: int) -> int:
    """About the size of an epoch's checkpoint: the weights and the update rule's state,
    and room for its JSON record (about 9 KB measured)."""
    sizes = [inputs, *hidden, 1]
    params = sum((a + 1) * b for a, b in zip(sizes, sizes[1:]))
    itemsize = 4 if dtype == "float32" else 8
    return (1 + state_slots) * params * itemsize + (16 << 10)
