"""``nepa-scale``: thin subcommands over the library (cli/runs.py: one run; cli/study.py: a study;
cli/sweep.py: a sweep file's actions).

The project's own errors (``nepa_scale.errors.NepaError``: config, data, checkpoint, layout, fit,
sweep) are printed as one line: exit code 2 when the command as given cannot run (``UsageError``:
a bad config value, a folder that is not there), 1 for the rest. Anything else (a bug,
a device out of memory) keeps its traceback; out of memory adds a hint. The commands import the
heavy parts of the library (torch, DeepSpeed, pandas) when they run, so that ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import sys

from nepa_scale.cli import runs, study, sweep
from nepa_scale.cli.errors import OUT_OF_MEMORY_HINT, fail, one_line
from nepa_scale.errors import NepaError, PeerLost, UsageError
from nepa_scale.launch.profiles import EXECUTORS
from nepa_scale.rundir import REQUEUE_EXIT_CODE

# What `nepa-scale --help` opens with: for the people who run studies, not for this package's developers.
DESCRIPTION = (
    "Scaling studies of NEPA vision pretraining: train, evaluate and export runs, plan and launch sweeps "
    "(on SLURM or this machine), and fit scaling laws to a study's runs. "
    "`nepa-scale COMMAND --help` gives each command's options."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nepa-scale", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    runs.add_commands(sub)
    study.add_commands(sub, EXECUTORS)
    sweep.add_commands(sub, EXECUTORS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        return fail(str(exc).splitlines()[0], code=2)
    except PeerLost as exc:  # resumable: the code a scheduler reads as "run me again"
        return fail(one_line(exc), code=REQUEUE_EXIT_CODE)
    except NepaError as exc:
        return fail(one_line(exc), code=1)
    except Exception as exc:
        if type(exc).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
            print(OUT_OF_MEMORY_HINT, file=sys.stderr)
        raise
