"""The error tree every layer speaks; the edges turn it into gr.Error or an HTTP status."""

from __future__ import annotations


class ServiceError(Exception):
    """A failure the user should see: a readable message, an HTTP-like status, a request id."""

    status: int = 500
    default_message = "The request failed."
    param: str | None = None  # the input field at fault, when there is one
    code: str | None = None  # OpenAI's error code (context_length_exceeded, insufficient_quota)
    error_type: str | None = None  # OpenAI's error type, when the upstream gave one
    upstream_status: int | None = None  # the backend's HTTP status, for an upstream error

    def __init__(
        self,
        message: str | None = None,
        *,
        request_id: str | None = None,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.request_id = request_id
        self.param = param or self.param
        self.code = code or self.code
        self.error_type = error_type or self.error_type
        super().__init__(self.message)

    def __str__(self) -> str:
        if self.request_id:
            return f"{self.message} (request id: {self.request_id})"
        return self.message


class ConfigError(ServiceError):
    """Configuration is invalid; raised at start, before anything serves."""


class InvalidRequest(ServiceError):
    """The input broke a bound or a rule; nothing was sent upstream."""

    status = 400
    default_message = "The request is invalid."


class DatabaseUnavailable(ServiceError):
    """The database (quotas, users) does not answer."""

    status = 503
    default_message = (
        "The database is not answering, so quotas cannot be checked right now. Try again in a "
        "moment."
    )


class NotConfigured(ServiceError):
    """The active provider lacks something it needs (a key, a model)."""

    status = 503
    default_message = "The upstream is not configured."


class Unsupported(ServiceError):
    """The active provider cannot do this function at all."""

    status = 501
    default_message = "This backend does not support that function."


class UpstreamAuthError(ServiceError):
    """The upstream refused our credentials (401/403)."""

    status = 502
    default_message = (
        "The upstream rejected the API key. Check OPENAI_API_KEY (and OPENAI_BASE_URL)."
    )


class UpstreamForbidden(ServiceError):
    """The upstream refused this request for our key (403): a model or feature it may not
    use. Not the caller's credentials, and no retry will change it."""

    status = 403
    error_type = "permission_error"
    default_message = "The upstream does not allow this (for example this model) with our key."


class ModelNotFound(ServiceError):
    """The upstream does not know the model, or the key has no access to it."""

    code = "model_not_found"

    status = 404
    default_message = "The model does not exist or this key has no access to it."


class RateLimited(ServiceError):
    """The upstream (or a quota) refused for now; try again later."""

    status = 429
    code = "rate_limit_exceeded"
    default_message = "The upstream is rate limiting requests. Wait a moment and try again."

    def __init__(
        self,
        message: str | None = None,
        *,
        request_id: str | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
    ) -> None:
        super().__init__(
            message, request_id=request_id, param=param, code=code, error_type=error_type
        )
        self.retry_after = retry_after


class UpstreamRejected(ServiceError):
    """The upstream said the request itself is bad (a 4xx other than the ones above)."""

    status = 400
    default_message = "The upstream rejected the request."


class UpstreamTooLarge(UpstreamRejected):
    """The upstream found the request too large (413)."""

    status = 413
    code = "request_too_large"


class UpstreamError(ServiceError):
    """The upstream failed on its side (5xx) or sent something we cannot read."""

    status = 502
    default_message = "The upstream failed. Try again in a moment."


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within REQUEST_TIMEOUT."""

    status = 504
    default_message = "The upstream did not answer in time (REQUEST_TIMEOUT)."


class UpstreamUnavailable(UpstreamError):
    """The upstream could not be reached at all."""

    status = 503
    default_message = "Could not connect to the upstream. Check OPENAI_BASE_URL and the network."


class UpstreamClosed(UpstreamError):
    """The upstream closed a fresh connection without answering. It may have read the whole
    request and done (and billed) the work, so it is not sent again, nor to a fallback."""

    default_message = (
        "The upstream closed the connection without answering. It may have processed the "
        "request, so it was not sent again."
    )


class StreamInterrupted(UpstreamError):
    """A streamed reply stopped before it was complete."""

    default_message = "The reply stream was cut off before it finished. Try again."


class QuotaExceeded(RateLimited):
    """The caller's own quota (requests per minute or tokens per day) is used up."""

    code = "quota_exceeded"

    default_message = "You reached your usage limit. Try again later."


class Forbidden(ServiceError):
    """The caller's role does not allow this."""

    status = 403
    default_message = "Only admins may do that."


class NotFound(ServiceError):
    """A thing the caller named does not exist, or is not theirs (the same answer for both)."""

    status = 404
    default_message = "Not found."
