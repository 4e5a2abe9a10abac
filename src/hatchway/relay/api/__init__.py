"""The relay's REST API, version 1 (``/api/v1``): see ``app.py``."""

from hatchway.relay.api.core import (
    OTP_REQUIRED,
    PASSWORD_CHANGE_REQUIRED,
    UNAUTHORIZED,
    ApiError,
    check_password,
)

__all__ = [
    "OTP_REQUIRED",
    "PASSWORD_CHANGE_REQUIRED",
    "UNAUTHORIZED",
    "ApiError",
    "check_password",
]
