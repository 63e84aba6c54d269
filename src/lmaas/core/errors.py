"""The one error tree of lmaas.

Every failure a caller can see is an :class:`LmaasError`. The classes carry no HTTP: the API layer
maps them to status codes in one table (``lmaas.api.errors``). Each class has a stable ``code``
string, which is also how an error crosses the worker IPC boundary (:func:`error_from_code`).

Tree::

    LmaasError
    ├── InvalidRequestError          bad parameter, malformed body, context overflow
    │   └── UnsafeModelError         pickle weights / trust_remote_code without the flag
    ├── PayloadTooLargeError         body over the cap
    ├── AuthenticationError          missing or invalid key
    ├── PermissionDeniedError        key lacks scope
    ├── NotFoundError                unknown model, version or object
    │   └── ModelNotFoundError
    ├── ConflictError                the object exists already
    │   └── GateRefusedError         a deployment gate refused a promotion
    ├── RateLimitError               per-key rate or concurrency (retryable)
    │   └── QuotaExceededError       a quota per day or month is used up
    ├── NotSupportedError            valid request for a feature this model lacks
    ├── ServiceUnavailableError      retryable: overload, not ready, draining, worker crash
    │   ├── ModelNotReadyError
    │   ├── OverloadedError
    │   ├── WorkerCrashedError
    │   └── DrainingError
    ├── DeadlineExceededError        the request ran past its deadline
    ├── ModelLoadError               a model could not be loaded (checksum, format, weights)
    │   └── ChecksumMismatchError
    ├── OfflineError                 a network source while the machine is offline
    └── InternalError                a bug; the message shown to clients is generic
"""

from __future__ import annotations


class LmaasError(Exception):
    """Base of every lmaas error.

    Args:
        message: Human-readable text, safe to show to the caller.
        param: The request parameter at fault, where there is one.
    """

    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(LmaasError):
    code = "invalid_request"


class UnsafeModelError(InvalidRequestError):
    code = "unsafe_model"


class PayloadTooLargeError(LmaasError):
    code = "payload_too_large"


class AuthenticationError(LmaasError):
    code = "invalid_api_key"


class PermissionDeniedError(LmaasError):
    code = "permission_denied"


class NotFoundError(LmaasError):
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class ConflictError(LmaasError):
    code = "conflict"


class GateRefusedError(ConflictError):
    """A promotion the deployment gate refused (the canary's evaluation is worse)."""

    code = "gate_refused"


class RateLimitError(LmaasError):
    """Args: retry_after_s: seconds the caller should wait before retrying."""

    code = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: float = 1.0
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class QuotaExceededError(RateLimitError):
    """A key's or tenant's quota for the current day or month is used up; ``retry_after_s`` is
    the time until the period resets."""

    code = "quota_exceeded"


class NotSupportedError(LmaasError):
    code = "not_supported"


class ServiceUnavailableError(LmaasError):
    """Retryable. Args: retry_after_s: seconds the caller should wait before retrying."""

    code = "service_unavailable"

    def __init__(
        self, message: str, *, param: str | None = None, retry_after_s: float = 1.0
    ) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class ModelNotReadyError(ServiceUnavailableError):
    code = "model_not_ready"


class OverloadedError(ServiceUnavailableError):
    code = "overloaded"


class WorkerCrashedError(ServiceUnavailableError):
    code = "worker_crashed"


class DrainingError(ServiceUnavailableError):
    code = "draining"


class DeadlineExceededError(LmaasError):
    code = "deadline_exceeded"


class ModelLoadError(LmaasError):
    code = "model_load_failed"


class ChecksumMismatchError(ModelLoadError):
    code = "checksum_mismatch"


class OfflineError(LmaasError):
    code = "offline"


class InternalError(LmaasError):
    code = "internal_error"


def _all_subclasses(cls: type[LmaasError]) -> list[type[LmaasError]]:
    found: list[type[LmaasError]] = [cls]
    for sub in cls.__subclasses__():
        found.extend(_all_subclasses(sub))
    return found


def error_from_code(code: str, message: str, param: str | None = None) -> LmaasError:
    """Rebuild an error that crossed a process boundary as ``(code, message, param)``.

    An unknown code becomes an :class:`InternalError` so nothing is lost silently.
    """
    for cls in _all_subclasses(LmaasError):
        if cls.code == code:
            return cls(message, param=param)
    return InternalError(message, param=param)
