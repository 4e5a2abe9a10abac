"""The exception tree of Hatchway.

    HatchwayError
    ├── ConfigError                 bad configuration or command-line input
    ├── ProtocolError               a tunnel protocol violation
    │   ├── LocalProtocolError      we were asked to do something the protocol forbids
    │   └── RemoteProtocolError     the peer sent something the protocol forbids
    ├── AuthenticationError         credentials were refused
    ├── NotFoundError               a stored device, user or token does not exist
    ├── AlreadyExistsError          a stored device or user already exists
    ├── ChannelOpenError            a channel could not be opened (carries a reason code)
    └── RelayError                  the relay answered a client request with an error

Library exceptions are translated into these where they enter Hatchway code.
"""

from __future__ import annotations


class HatchwayError(Exception):
    """Root of every exception Hatchway raises on purpose."""


class ConfigError(HatchwayError):
    """Invalid configuration or command-line input."""


class ProtocolError(HatchwayError):
    """A violation of the tunnel protocol."""


class LocalProtocolError(ProtocolError):
    """This endpoint tried to do something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class AuthenticationError(HatchwayError):
    """Credentials were refused."""


class NotFoundError(HatchwayError):
    """The named device, user or token is not in the store."""


class AlreadyExistsError(HatchwayError):
    """A device or user with that name is already in the store."""


class ChannelOpenError(HatchwayError):
    """A channel could not be opened; ``reason`` is a ``mux.OpenFailure`` code."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class RelayError(HatchwayError):
    """The relay refused a client request; ``message`` is meant for a person."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
