"""Failed logins per source address: a sliding window, in memory.

Account lockout (the store) protects one account from a slow guesser anywhere; this
protects all accounts from one fast guesser: an address with ``limit`` failed logins in
the last ``window`` seconds is refused (429) until the oldest of them is that old.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque


class LoginThrottle:
    def __init__(self, limit: int = 20, window: float = 600.0, max_sources: int = 100_000):
        self.limit = limit
        self.window = window
        self.max_sources = max_sources
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, source: str, now: float | None = None) -> int:
        """Seconds until ``source`` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        failures = self._failures.get(source)
        if failures is None:
            return 0
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[source]
            return 0
        if len(failures) < self.limit:
            return 0
        return max(1, int(failures[0] + self.window - now + 0.999))

    def failed(self, source: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._failures.get(source)
        if failures is None:
            if len(self._failures) >= self.max_sources:
                self._failures.popitem(last=False)
            failures = self._failures[source] = deque(maxlen=self.limit)
        failures.append(now)
        self._failures.move_to_end(source)
