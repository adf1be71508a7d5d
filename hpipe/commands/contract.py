"""How every command ends: one error contract, whatever went wrong.

| what happened | exit | what the user sees |
|---|---|---|
| success | 0 | the command's output |
| a user error (``HPipeError``: a bad flag, file, prompt, plan) | 2 | one line naming the value and the fix |
| a runtime failure (a worker died or stopped, a link dropped) | 1 | one line naming the rank and the cause |
| Ctrl-C | 130 | one line saying what was stopped; every worker ended |
| SIGTERM | 143 | the same |
| a bug of ours | 1 | one line, and ``--debug`` for the traceback |

No traceback reaches the user unless ``--debug`` is given. With ``--json``, a failure also
prints one JSON object on stdout: ``{"error": {"type", "message", "rank"?}}``. Under torchrun,
``run``, ``serve`` and ``analyze`` are a job whose rank 0 reports the job's errors and whose other ranks
report only their own (joining, a store that went away), on their hosts' terminals; in
``profile`` every rank meets the same errors, so only rank 0 speaks.

SIGTERM is turned into an exception (``Terminated``) in the main thread, so it unwinds the same
``with`` blocks Ctrl-C does: a Session closes and ends its workers, partial outputs already
written stay.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from contextlib import contextmanager

from hpipe.errors import HPipeError, ShapeMismatchError, WorkerFailedError

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(BaseException):
    """SIGTERM arrived (a BaseException, like KeyboardInterrupt: no ``except Exception`` eats
    it on the way up)."""


@contextmanager
def sigterm_raises():
    """While inside, SIGTERM raises Terminated in the main thread."""
    def on_sigterm(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: leave the default
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_command(args) -> int:
    """``args.func(args)`` under the contract above; returns the exit code."""
    name = f"hpipe {args.command}"
    try:
        with sigterm_raises():
            return args.func(args)
    except HPipeError as e:
        return _failed(args, name, e, EXIT_USAGE, f"error: {e}")
    except (WorkerFailedError, ShapeMismatchError) as e:
        return _failed(args, name, e, EXIT_FAILED, f"failed: {e}")
    except KeyboardInterrupt as e:
        return _failed(args, name, e, EXIT_INTERRUPTED,
                       "interrupted (Ctrl-C): stopped; every worker it started has ended")
    except Terminated as e:
        return _failed(args, name, e, EXIT_TERMINATED,
                       "terminated (SIGTERM): stopped; every worker it started has ended")
    except BrokenPipeError:  # `hpipe ... | head` closed the pipe: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # a bug of ours: one line, the traceback on request
        return _failed(args, name, e, EXIT_FAILED,
                       f"internal error: {type(e).__name__}: {e}; rerun with --debug for the "
                       "traceback, and please report it")


def usage_failed(error: Exception, *, command: str | None, json_wanted: bool) -> int:
    """A command line the parser refused (before there are ``args``)."""
    from types import SimpleNamespace

    args = SimpleNamespace(json=json_wanted, debug=False)
    name = f"hpipe {command}" if command else "hpipe"
    return _failed(args, name, error, EXIT_USAGE, f"error: {error}")


def _failed(args, name: str, error: BaseException, code: int, line: str) -> int:
    if not _speaks(getattr(args, "command", None)):
        return code
    if getattr(args, "debug", False):
        traceback.print_exception(error, file=sys.stderr)
    print(f"{name}: {line}", file=sys.stderr)
    if getattr(args, "json", False):
        body = {"type": type(error).__name__, "message": str(error) or line}
        rank = getattr(error, "rank", None)
        if rank is not None:
            body["rank"] = rank
        print(json.dumps({"error": body}))
    return code


def _speaks(command: str | None) -> bool:
    """Whether this process reports its failure (see the module docstring on torchrun)."""
    if command in ("run", "serve", "analyze"):  # a job's other ranks have errors of their own
        return True
    return os.environ.get("RANK", "0") == "0" or "MASTER_ADDR" not in os.environ
