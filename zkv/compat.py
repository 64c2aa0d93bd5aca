"""Names from the original ``shared_memory`` module, for code written against it.

The original module exposed a ``KeyValueStore`` class (``set``, ``get``, ``delete``,
``get_all``, ``publish``, ``on_subscriber_receive``) and a singleton behind
``GlobalKeyValueStore.get_instance()``, imported as ``shared_memory``. In zkv:

- ``zkv.shared_memory`` and ``GlobalKeyValueStore.get_instance()`` are :func:`zkv.store`;
- ``KeyValueStore`` is :class:`zkv.Store` (the type, for annotations and ``isinstance``).
"""

from __future__ import annotations

from .store import Store, store

__all__ = ["GlobalKeyValueStore", "KeyValueStore"]

KeyValueStore = Store


class GlobalKeyValueStore:
    """The original singleton accessor."""

    @staticmethod
    def get_instance() -> Store:
        """The process-wide store (:func:`zkv.store`)."""
        return store()
