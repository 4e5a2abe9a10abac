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


def network_error_text(exc: BaseException) -> str:
    """What went wrong with a connection, in words a person reads in a sentence
    ("cannot reach the relay R: connection refused"), not the C library's."""
    import os
    import socket
    import ssl

    if isinstance(exc, socket.gaierror):
        return (
            "host not found"
            if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME))
            else (f"name lookup failed ({exc.strerror})")
        )
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "WRONG_VERSION_NUMBER":
            return "it does not speak TLS there (is that the relay's port?)"
        return f"TLS failed ({exc.reason or exc})"
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and (exc.errno or exc.strerror):
        # The system's words for the errno: asyncio puts its own around them ("error
        # while attempting to bind on address ('127.0.0.1', 80): ...").
        text = os.strerror(exc.errno) if exc.errno else str(exc.strerror)
        return text[:1].lower() + text[1:]
    return str(exc) or type(exc).__name__
