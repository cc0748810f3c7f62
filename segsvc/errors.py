"""Domain errors.

Lower layers raise these; the gRPC boundary (``segsvc/server/errors.py``) maps
them to status codes in one table and the client maps status codes back. Every
message names the problem and, where it can, how to fix it.
"""

from __future__ import annotations


class SegsvcError(Exception):
    """Base class of every error segsvc raises on purpose."""


# -- the caller asked for something malformed (INVALID_ARGUMENT) -------------
class InvalidArgument(SegsvcError):
    """A request, option, spec or file given by the caller is malformed."""


class InvalidImage(InvalidArgument):
    """Image bytes or a raw tensor could not be turned into an image."""


class ImageTooLarge(InvalidImage):
    """An image exceeds the configured pixel or byte limit (checked before decoding)."""


class ResponseTooLarge(InvalidArgument):
    """The response would exceed the server's gRPC message limit (``--max-message-mb``).

    Refused before any work where its size follows from the request (raw label maps, confidence,
    Open Inference Protocol outputs), else once encoded (PNG). The same request always fails, so
    it is the caller's to change (drop confidence, PNG labels, a smaller image), not to retry:
    INVALID_ARGUMENT, never RESOURCE_EXHAUSTED (``Overloaded``, "back off and retry").
    """


class ModelConfigError(InvalidArgument):
    """A model spec names unknown parameters, bad values or unavailable weights."""


class PathOutsideRoot(InvalidArgument):
    """A path named by a request escapes its configured root directory."""


class DatasetError(InvalidArgument):
    """A dataset is missing, malformed or inconsistent."""


class UploadError(InvalidArgument):
    """An uploaded chunk breaks a rule: unsafe name, wrong offset, hash mismatch or a size limit."""


# -- the thing asked for does not exist (NOT_FOUND) ---------------------------
class NotFound(SegsvcError):
    """A named model, version, job or file does not exist."""


class UnknownModel(NotFound):
    """No model of that name is registered or in the repository."""


class UnknownVersion(NotFound):
    """The model exists but not in that version."""


class JobNotFound(NotFound):
    """No long-running job (operation) has that id; it never existed or was deleted."""


# -- stored state is broken (FAILED_PRECONDITION / DATA_LOSS) ----------------
class ArtifactError(SegsvcError):
    """A model artifact is corrupt or does not match its manifest."""


class FailedPrecondition(SegsvcError):
    """The system is not in a state the request needs (e.g. deleting a job that still runs)."""


class DatasetInvalid(FailedPrecondition):
    """A dataset failed its check (``segsvc data check``); ``problems`` lists every one.

    Each problem is ``(kind, path, detail)``: the kind (``Fault`` value, e.g.
    "labels outside the classes"), the file relative to the dataset, and what is
    wrong. The server sends them as ``google.rpc.PreconditionFailure`` details.
    """

    def __init__(self, message: str, problems: tuple[tuple[str, str, str], ...] = ()) -> None:
        super().__init__(message)
        self.problems = tuple(problems)


class ExportError(FailedPrecondition):
    """A model version cannot be exported (``segsvc export``), or its export does not reproduce it.

    The message names the reason: an operator the exporter cannot express with a
    dynamic input size, or the validation numbers (max |logit difference| and
    label agreement) of an export that was refused.
    """


class AlreadyExists(SegsvcError):
    """Something that is never overwritten (a model version, a job id) already exists."""


# -- operational conditions ---------------------------------------------------
class Overloaded(SegsvcError):
    """A bounded queue is full; the caller should back off and retry (RESOURCE_EXHAUSTED)."""


class DeadlineExceeded(SegsvcError):
    """The caller's deadline passed before the work finished."""


class Cancelled(SegsvcError):
    """The caller cancelled the request."""


class JobFailed(SegsvcError):
    """A batch or training job ran and failed (ABORTED: its Operation's error, ``ErrorInfo`` reason JOB_FAILED)."""


class Unavailable(SegsvcError):
    """The service is starting, draining or shutting down (UNAVAILABLE)."""


class PermissionDenied(SegsvcError):
    """The caller's token is valid but lacks the scope the call needs (e.g. management)."""


class Unauthenticated(SegsvcError):
    """A required bearer token is missing or wrong."""


class Unimplemented(SegsvcError):
    """A method of a standard protocol that segsvc does not serve (UNIMPLEMENTED); the message says what to use."""
