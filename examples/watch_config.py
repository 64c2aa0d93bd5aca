"""Workers that reload their configuration when a config key changes.

Run it with ``python examples/watch_config.py``. The configuration lives in the store under
``config.*``. Each worker reads it once at start, then keeps working with its own copy and
refreshes that copy from change events (``@store.on_change(prefix="config.")``): no polling, and
every worker sees the changes in the order the owner applied them, whoever made them. After each
reload a worker acknowledges the store's version on the ``"reloaded"`` channel, so the main
process knows when every worker runs with the new settings.

What it shows: ``on_change`` callbacks and ``watch()`` subscribers receiving
:class:`zkv.Change` events (key, kind, value, version) for ``set``, ``incr`` and ``delete``
made in any process.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Any

import zkv
from zkv.testing import wait_for  # poll a condition with a deadline

WORKERS = 3


def worker(name: str) -> None:
    """Work with a local copy of config.*, kept fresh by change events, until config.stop."""
    kv = zkv.store()
    lock = threading.Lock()
    changed = threading.Event()
    config: dict[str, Any] = {}

    @kv.on_change(prefix="config.")
    def reload(change: zkv.Change) -> None:
        # On this process's dispatcher thread, in the order the owner applied the changes.
        with lock:
            option = change.key.removeprefix("config.")
            if change.kind == "delete":
                config.pop(option, None)
            else:
                config[option] = change.value
        kv.publish("reloaded", (name, change.key, change.kind, change.value, change.version))
        changed.set()

    # Read the current values after registering, so that no change falls in between (events
    # of changes made meanwhile are replayed in order on top: the copy ends up right).
    snapshot = kv.get_all()
    with lock:
        config.update((key.removeprefix("config."), value)
                      for key, value in snapshot.items() if key.startswith("config."))
    kv.incr("workers_ready")

    done = 0
    while True:
        with lock:
            if config.get("stop"):
                break
            factor, mode = config.get("factor", 1), config.get("mode", "plain")
        # "Work" with the current settings; results go to the store.
        done += 1
        kv.set(f"work:{name}", {"done": done, "factor": factor, "mode": mode})
        changed.wait(0.05)  # work a little, or wake up early on a change
        changed.clear()


def wait_until_all_reloaded(replies: zkv.Subscriber, version: int) -> None:
    """Collect acknowledgements until every worker has applied change ``version``."""
    seen: set[str] = set()
    while len(seen) < WORKERS:
        name, key, kind, value, v = replies.receive(timeout=30)
        if v == version:
            seen.add(name)
            print(f"  {name} reloaded {key} ({kind} -> {value!r})")


def all_working_with(kv: zkv.Store, factor: int) -> bool:
    return all(kv.get(f"work:w{i}", {}).get("factor") == factor for i in range(WORKERS))


def main() -> int:
    kv = zkv.serve()
    try:
        kv.update({"config.factor": 2, "config.mode": "fast"})
        replies = kv.subscribe("reloaded")
        audit = kv.watch(prefix="config.")  # the main process watches too
        ctx = mp.get_context("spawn")
        workers = [ctx.Process(target=worker, args=(f"w{i}",)) for i in range(WORKERS)]
        for proc in workers:
            proc.start()
        wait_for(lambda: kv.get("workers_ready") == WORKERS, 30, what="workers ready")

        for change in [lambda: kv.set("config.factor", 3),
                       lambda: kv.incr("config.factor", 10),
                       lambda: kv.delete("config.mode")]:
            change()
            event = audit.receive(timeout=10)
            print(f"changed {event.key}: {event.kind} -> {event.value!r} (v{event.version})")
            wait_until_all_reloaded(replies, event.version)
            # Every worker now works with the new settings.
            factor = kv["config.factor"]
            wait_for(lambda f=factor: all_working_with(kv, f), 10, what="new factor in use")

        kv.set("config.stop", True)
        for proc in workers:
            proc.join(30)
        assert all(proc.exitcode == 0 for proc in workers)
        final = [kv[f"work:w{i}"] for i in range(WORKERS)]
        assert all(w["factor"] == 13 and w["mode"] == "plain" for w in final), final
        print(f"all {WORKERS} workers stopped with factor 13, mode plain")
        replies.close()
        audit.close()
        return 0
    finally:
        kv.close()


if __name__ == "__main__":
    raise SystemExit(main())
