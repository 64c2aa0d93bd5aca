"""The owner: the process that holds the data and serves it to the others.

- :mod:`~zkv.owner.loop`: the loop thread (:class:`Owner`) and its housekeeping;
- :mod:`~zkv.owner.binding`: the ROUTER and XPUB sockets, ipc or tcp with CURVE;
- :mod:`~zkv.owner.requests`: serving requests from the table of operations;
- :mod:`~zkv.owner.sessions`: HELLO, sessions, dead clients, refusals;
- :mod:`~zkv.owner.fanout`: subscriptions, published messages, change events, invalidations;
- :mod:`~zkv.owner.outbox`: work that the owner's other threads hand to the loop;
- :mod:`~zkv.owner.local`: the owner-local core, for the owner's own process.
"""

from __future__ import annotations

from .local import LocalCore
from .loop import Owner
from .sessions import OWNER_SESSION

__all__ = ["OWNER_SESSION", "LocalCore", "Owner"]
