"""One exception family whose messages are written for the user.

Library code raises these; the CLI turns any of them into one line on stderr and a
non-zero exit. A message says what went wrong, where (file, key, URL) and what to do.
"""


def display(name: str) -> str:
    """`name` as valid Unicode, for every output: bytes of a file name that are not UTF-8
    (Python holds them as surrogates) become the text `\\xNN`; nothing else changes (each
    output escapes control characters its own way: errors.printable, JSON's escapes)."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file name gave
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def printable(text: str) -> str:
    """`text` with control characters (a newline in a file name, an escape sequence from a
    server or a damaged file) shown as escapes and bytes that are not UTF-8 as `\\xNN`: it
    stays one line and cannot drive the terminal. Every value a command prints that came
    from outside goes through here."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in display(str(text)))


def quoted(value: object, limit: int = 60) -> str:
    """`value` as Python writes it (`'epoch-x'`), cut to `limit` characters with its length
    said, so that a message quoting what a user typed stays readable."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}… ({len(text) - 2:,} characters)"


class MlecliError(Exception):
    """Base of every error the user is meant to read."""


class ConfigError(MlecliError):
    """A config file or a --set override is wrong."""


class DataError(MlecliError):
    """A dataset file is malformed, or does not match what was expected."""


class DownloadError(MlecliError):
    """Every mirror failed for a file."""


class CheckpointError(MlecliError):
    """A run folder or checkpoint cannot be used."""


class TrainingError(MlecliError):
    """Training cannot go on (for example the log-likelihood stopped being finite)."""


class Stopped(BaseException):
    """A signal stopped a command before it had anything to save (while training's data
    was fetched, say). Not an MlecliError: like KeyboardInterrupt, nothing may swallow it."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class InputError(MlecliError):
    """An input of `predict` (an image, array or folder) cannot be read or used."""
