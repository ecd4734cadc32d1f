"""The project's own errors: bad input a user can fix, reported by the CLI as one line.

Everything else (a device out of memory, a bug) is not a ``NepaError`` and keeps its traceback.
"""

from __future__ import annotations

import re


class NepaError(Exception):
    """Base class of every error the user can act on from its message alone."""


class UsageError(NepaError):
    """The command as given cannot run: a bad argument, a file or folder named on it that is not
    there (the CLI exits 2 for these, 1 for the other project errors)."""


class ConfigError(UsageError, ValueError):
    """A bad configuration value; the message names the key."""


class DataError(NepaError):
    """Training or evaluation data that cannot be used; the message names the folder or file."""


class CheckpointError(NepaError):
    """A committed checkpoint that cannot be used; the message names the file."""


class UnsafePickle(CheckpointError):
    """A torch file that would call or build something no checkpoint holds when unpickled (a file
    from elsewhere may run code that way): refused before it is unpickled; the message names it."""

    @classmethod
    def naming(cls, file: object, named: list[str] | BaseException) -> UnsafePickle:
        """The refusal of ``file``: what it names (a list), or torch's weights-only refusal of it,
        whose message takes several lines and advises loading the file unsafely if trusted."""
        if isinstance(named, BaseException):
            found = re.search(r"GLOBAL ([\w.]+)", str(named))
            named = [found.group(1)] if found else []
        what = f"it names {', '.join(named)}" if named else "it holds more than tensors and plain values"
        return cls(
            f"refusing to unpickle {file}: {what} (a torch file from a run directory or a weight file "
            "may hold only tensors, plain values and the few classes DeepSpeed's checkpoints hold: "
            "unpickling anything else could run code)"
        )


class ResumeRefused(NepaError):
    """The config changed in a way the newest checkpoint cannot continue; the message names the key."""


class NonFiniteLoss(NepaError):
    """The loss became NaN or infinite: the run stops before any checkpoint is written after it
    (``step``: the first step whose loss was not finite, what run.json records)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step


class BackendUnavailable(NepaError, RuntimeError):
    """An attention backend that was asked for by name cannot run here."""


class LayoutError(NepaError, ValueError):
    """Weights that do not fit the official layout or the model."""


class FitError(NepaError, ValueError):
    """A scaling fit that cannot be made from the data given."""


class RunRecordError(NepaError):
    """run.json exists but cannot be read."""


class SweepError(NepaError):
    """A sweep action that cannot be carried out (a run never launched, a job without tasks)."""


class StorageError(NepaError):
    """The run's directory has no room left (a full disk or quota); the message names it."""


class PeerLost(NepaError):
    """Another rank of the run is gone (its node failed, its task was killed): this rank's
    collectives cannot go on. The run is recorded interrupted at its last committed checkpoint and
    resumes from there (``recorded``: this rank wrote the record)."""

    def __init__(self, message: str, committed_step: int, recorded: bool):
        super().__init__(message)
        self.committed_step, self.recorded = committed_step, recorded


class RunBusy(NepaError):
    """Another live process owns the directory (a run's, or a study's): the message names it
    (``nepa_scale/ownership.py``)."""
