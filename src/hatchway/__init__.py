"""Hatchway: secure remote access to devices behind NAT.

Parts, each in its own sub-package:

- ``hatchway.mux``: the sans-I/O tunnel multiplexer (frames, channels, flow control).
- ``hatchway.tunnel``: asyncio adapters that run the multiplexer over a WebSocket.
- ``hatchway.relay``: the relay server.
- ``hatchway.agent``: the device agent (needs only ``websockets`` and the stdlib).
- ``hatchway.client``: the user's command-line client.
- ``hatchway.store``: persistent storage (devices, users, tokens).
- ``hatchway.auth``: device challenge-response, passwords, API tokens.
"""

__version__ = "0.1.0"

from hatchway import extensions as _extensions

_extensions.install_switch()
