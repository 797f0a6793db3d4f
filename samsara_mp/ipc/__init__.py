"""Worker-to-publisher IPC: authenticated Unix-socket connections whose every wait
is bounded (docs/design.md, "IPC"). The authkey file is the trust boundary:
whoever can read it can make the publisher unpickle what they send."""

from __future__ import annotations

from .auth import PROTOCOL_VERSION, HandshakeError, VersionMismatch, connect
from .connection import BadFrame, Connection, IPCError, IPCTimeout, ProtocolViolation, Refused
from .server import Handler, Server

__all__ = [
    "PROTOCOL_VERSION", "BadFrame", "Connection", "HandshakeError", "Handler", "IPCError", "IPCTimeout",
    "ProtocolViolation", "Refused", "Server", "VersionMismatch", "connect",
]
