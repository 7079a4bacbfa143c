"""Errors the services raise; the API turns each into an RFC 7807 problem with its status."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    slug = "bad-request"
    title = "Bad request"
    headers: dict[str, str] | None = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status, slug, title = 404, "not-found", "Not found"


class Conflict(ServiceError):
    status, slug, title = 409, "conflict", "Conflict"


class Invalid(ServiceError):
    status, slug, title = 422, "invalid", "Invalid request"


class QuotaExceeded(ServiceError):
    status, slug, title = 403, "quota-exceeded", "Quota exceeded"


class Unavailable(ServiceError):
    """Temporarily unable (pool empty, flavor degraded, boot failed): retry after `retry_after_s`."""

    status, slug, title = 503, "unavailable", "Service unavailable"

    def __init__(self, detail: str, retry_after_s: float = 5.0, slug: str | None = None) -> None:
        super().__init__(detail)
        self.headers = {"Retry-After": str(max(1, round(retry_after_s)))}
        if slug:
            self.slug = slug


class VmmFailed(ServiceError):
    """The VMM or its guest agent answered with an error."""

    status, slug, title = 502, "vmm-error", "VMM error"


class Forbidden(ServiceError):
    """Allowed by no setting of this pclited (the detail names the setting)."""

    status, slug, title = 403, "forbidden", "Forbidden"


class TooLarge(ServiceError):
    status, slug, title = 413, "too-large", "Content too large"
