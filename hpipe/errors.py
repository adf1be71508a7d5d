"""Typed errors a user can cause.

Every error a user can trigger is a ``HPipeError`` (a ``ValueError``) whose message names
the offending value and says how to fix it. Internal invariants use ``assert`` instead.
Runtime failures that are not the user's input (a worker died, a link dropped) are
``RuntimeError`` subclasses so callers can tell "fix your input" from "something broke".
"""


from contextlib import contextmanager


class HPipeError(ValueError):
    """Base class for errors caused by user input."""


@contextmanager
def naming_field(field: str, error: type[HPipeError], fix: str):
    """Inside, a malformed value (KeyError, TypeError, ValueError, AttributeError from reading
    a user's file) becomes ``error`` naming ``field``; typed errors pass through with the field
    in front."""
    try:
        yield
    except HPipeError as e:
        raise type(e)(f"{field}: {e}") from None
    except KeyError as e:
        raise error(f"{field}: missing field {e.args[0]!r}; {fix}") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise error(f"{field}: malformed value ({e}); {fix}") from None


class UnknownPresetError(HPipeError):
    """A model preset, device or cluster name that hpipe does not know."""


class ModelSpecError(HPipeError):
    """A model config that cannot be read or is inconsistent."""


class UnsupportedArchitectureError(ModelSpecError):
    """A checkpoint whose architecture hpipe does not implement."""


class WeightsNotFoundError(HPipeError):
    """A model path that does not exist or holds no weights."""


class PromptTooLongError(HPipeError):
    """A prompt (or sequence length) beyond the model's context window."""


class SliceError(HPipeError):
    """Token slices that do not add up to the prompt, or are not positive."""


class PromptError(HPipeError):
    """A prompt batch that is empty or whose rows differ in length, or an unreadable prompt file."""


class PromptShapeError(PromptError):
    """Prompts of a batch that cannot run together (different lengths, empty, ids outside the
    vocabulary)."""


class InputFileError(HPipeError):
    """An input file (cluster, plan, profile, documents) that is a directory, not text, cut
    short, or of another format or version: the message names the file and the field."""


class CapacityError(HPipeError):
    """A request whose KV cache could never fit beside the weights of some stage."""


class SettingError(HPipeError):
    """A setting outside its valid range, given through the Python API (the CLI's parser
    refuses the same values first); the message gives the range."""


class UsageError(HPipeError):
    """A command line argparse refuses: an unknown flag, a missing one, a value out of range."""


class SamplingError(HPipeError):
    """Sampling settings out of range (temperature < 0, top_p outside (0, 1])."""


class OutputPathError(HPipeError):
    """An output file (--trace, --png, --out) that cannot be written where it was asked."""


class DeviceError(HPipeError):
    """A --device that torch cannot use here (not a device type, or no CUDA in this build)."""


class ChatTemplateError(HPipeError):
    """A model's chat template that does not render (a syntax error, or it raised)."""


class TokenizerNotFoundError(HPipeError):
    """A model opened without a usable tokenizer was asked to turn text into ids."""


class ClusterError(HPipeError):
    """A cluster description that is malformed: the message names the field."""


class InfeasiblePlanError(HPipeError):
    """No arrangement of the model fits the cluster (memory, or no devices)."""


class PlanMismatchError(HPipeError):
    """A plan that does not match the model or cluster it is used with."""


class ProfileMismatchError(HPipeError):
    """A profile recorded for another model or another cluster."""


class ShapeMismatchError(RuntimeError):
    """An activation arrived with a shape or dtype other than the plan says."""


class WorkerFailedError(RuntimeError):
    """A pipeline worker died, stopped answering, or a link dropped; the message names the
    rank and the cause, and ``rank`` holds it where one rank is to blame."""

    def __init__(self, message: str, *, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


def reported_error(type_name: str, message: str, *, rank: int | None = None) -> Exception:
    """A worker's reported failure, rebuilt on the supervisor's side: the hpipe error of that
    type name (a typed error stays typed across the process boundary), else a
    WorkerFailedError that blames ``rank``."""
    cls = globals().get(type_name)
    if isinstance(cls, type) and issubclass(cls, Exception) and cls is not WorkerFailedError:
        return cls(message)
    return WorkerFailedError(message, rank=rank)
