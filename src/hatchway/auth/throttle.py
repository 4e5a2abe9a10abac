"""Failed logins per source address: a sliding window, in memory.

Account lockout (the store) protects one account from a slow guesser anywhere; this
protects all accounts from one fast guesser: an address with ``limit`` failed logins in
the last ``window`` seconds is refused (429) until the oldest of them is that old.

Logins still being checked count too: ``reserve`` takes a place for an attempt before
it waits for a password check, so that a burst of concurrent logins gets no more checks
than failures are allowed. The place becomes a failure (``failed(..., reserved=True)``)
or is given back (``release``).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque

#: Seconds a source is told to wait when its places are held by attempts still being
#: checked (not failures yet: they may succeed).
IN_FLIGHT_RETRY_AFTER = 1


def source_key(address: str) -> str:
    """What the per-source limits count by: the address, or for IPv6 its /64 (one
    host usually holds a whole /64, so its addresses are one source)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return address


class LoginThrottle:
    def __init__(self, limit: int = 20, window: float = 600.0, max_sources: int = 100_000):
        self.limit = limit
        self.window = window
        self.max_sources = max_sources
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()
        #: Attempts reserved and not yet decided, per source (only while there are any).
        self._in_flight: dict[str, int] = {}

    def _recent(self, source: str, now: float) -> deque[float] | None:
        """The failures of ``source`` in the window (None: none)."""
        failures = self._failures.get(source)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[source]
            return None
        return failures

    def _wait(self, failures: deque[float] | None, now: float) -> int:
        if failures is None or len(failures) < self.limit:
            return 0
        return max(1, int(failures[0] + self.window - now + 0.999))

    def retry_after(self, source: str, now: float | None = None) -> int:
        """Seconds until ``source`` may try again (0: now), counting failures only."""
        now = time.monotonic() if now is None else now
        return self._wait(self._recent(source, now), now)

    def in_flight(self, source: str) -> int:
        """Attempts of ``source`` reserved and not yet decided."""
        return self._in_flight.get(source, 0)

    def reserve(self, source: str, now: float | None = None) -> int:
        """Take a place for one login attempt of ``source``: 0 if taken, else the seconds
        to wait (nothing taken).

        Failures and attempts in flight together stay below ``limit``. A place taken must
        be given back exactly once: ``failed(source, reserved=True)`` or ``release``.
        """
        now = time.monotonic() if now is None else now
        failures = self._recent(source, now)
        wait = self._wait(failures, now)
        if wait:
            return wait
        in_flight = self._in_flight.get(source, 0)
        if len(failures or ()) + in_flight >= self.limit:
            return IN_FLIGHT_RETRY_AFTER
        self._in_flight[source] = in_flight + 1
        return 0

    def release(self, source: str) -> None:
        """Give back a place ``reserve`` took, without a failure (success, error, or the
        attempt was abandoned)."""
        in_flight = self._in_flight.get(source, 0) - 1
        if in_flight > 0:
            self._in_flight[source] = in_flight
        else:
            self._in_flight.pop(source, None)

    def failed(self, source: str, now: float | None = None, *, reserved: bool = False) -> None:
        """Count a failed login of ``source``; ``reserved``: it had taken a place, which
        this turns into the failure."""
        if reserved:
            self.release(source)
        now = time.monotonic() if now is None else now
        failures = self._failures.get(source)
        if failures is None:
            if len(self._failures) >= self.max_sources:
                self._failures.popitem(last=False)
            failures = self._failures[source] = deque(maxlen=self.limit)
        failures.append(now)
        self._failures.move_to_end(source)
