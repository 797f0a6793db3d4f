"""The error hierarchy: one root, a few meaningful kinds.

``InvalidEvent`` and ``InvalidConfiguration`` keep the original ``samsara_sdk``
names so code written for it still catches them.
"""

from __future__ import annotations


class SamsaraError(Exception):
    """Root of every error samsara_mp raises."""


class InvalidEvent(SamsaraError, ValueError):
    """An event was refused in the caller; ``field`` names the offending field."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"invalid event: {field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidEvent], tuple[str, str]]:
        # Picklable, so it crosses a Pool's result queue intact.
        return (type(self), (self.field, self.reason))


class InvalidConfiguration(SamsaraError, ValueError):
    """A configuration value was refused; ``key`` names the offending key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid configuration: {key}: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self) -> tuple[type[InvalidConfiguration], tuple[str, str]]:
        return (type(self), (self.key, self.reason))


class PublishError(SamsaraError):
    """A synchronous publish did not reach a 2xx answer."""

    def __init__(self, message: str, status: int | None = None, body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class ChannelError(SamsaraError):
    """The channel's runtime directory or publisher could not be used safely."""


class ChannelTaken(ChannelError):
    """``Publisher.start()``: another publisher already serves the channel; ``pid`` is its pid."""

    def __init__(self, channel: str, pid: int | None) -> None:
        super().__init__(f"channel {channel} already has a publisher (pid {pid})")
        self.channel = channel
        self.pid = pid

    def __reduce__(self) -> tuple[type[ChannelTaken], tuple[str, int | None]]:
        return (type(self), (self.channel, self.pid))
