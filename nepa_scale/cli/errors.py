"""How the CLI says an error: one line for the project's own, the traceback for the rest."""

from __future__ import annotations

import re
import sys

OUT_OF_MEMORY_HINT = (
    "nepa-scale: the device ran out of memory: lower budget.micro_batch (gradient accumulation keeps "
    "the global batch) or checkpoint activations with model.grad_checkpointing=auto"
)


def one_line(exc: Exception) -> str:
    """The error's own line; for one re-raised from a DataLoader worker ("Caught DataError in
    DataLoader worker process 0." and the worker's traceback), the worker's message."""
    lines = str(exc).splitlines()
    if lines and lines[0].startswith("Caught ") and "worker" in lines[0]:
        raised = re.compile(rf"^(?:[\w.]+\.)?{type(exc).__name__}: (.*)$")  # the traceback's last line
        messages = [m.group(1) for m in map(raised.match, lines[1:]) if m]
        if messages:
            return messages[-1]
    return lines[0] if lines else type(exc).__name__


def fail(message: str, code: int = 2) -> int:
    print(f"nepa-scale: error: {message}", file=sys.stderr)
    return code
