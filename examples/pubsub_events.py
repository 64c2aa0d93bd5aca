"""An event bus across a pool of worker processes.

Run it with ``python examples/pubsub_events.py``. The main process owns the store and
dispatches order events on the ``"orders"`` channel; every worker receives every event (fan-out)
in the same order, and the first worker to *claim* an order in the store (an atomic
``compare_and_set``) handles it. A worker writes its result to the store, adds to a shared
counter, and reports on the ``"replies"`` channel. The main process collects the replies, checks
the store, and tells the workers to stop with one more event.

What it shows: ``publish`` from any process, ``@store.on_subscriber_receive`` callbacks in
workers, a ``Subscriber`` in the main process, subscriptions that are live when they return
(no event is missed, no sleep needed), and store calls from inside callbacks.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from typing import Any

import zkv
from zkv.testing import wait_for  # poll a condition with a deadline

WORKERS = 4
ORDERS = 24


def worker(name: str) -> None:
    """A worker process: handle the orders it claims until a "stop" event comes."""
    kv = zkv.store()  # finds the main process's store through ZKV_ENDPOINT
    stop = threading.Event()

    @kv.on_subscriber_receive("orders")
    def on_event(event: dict[str, Any]) -> None:
        # Runs on this process's dispatcher thread, one event at a time, in publish order.
        if event["type"] == "stop":
            stop.set()
            return
        order_id = event["id"]
        if not kv.compare_and_set(f"claim:{order_id}", zkv.MISSING, name):
            return  # another worker got it first
        total = sum(qty * price for qty, price in event["items"])
        kv.set(f"order:{order_id}", {"total": total, "by": name})
        kv.incr("revenue", total)
        kv.publish("replies", (order_id, name, total))

    # The subscription is live now: tell the main process we are ready.
    kv.incr("workers_ready")
    stop.wait(60)


def make_order(order_id: int) -> dict[str, Any]:
    items = [(1 + (order_id + k) % 3, 10 * (k + 1)) for k in range(1 + order_id % 4)]
    return {"type": "order", "id": order_id, "items": items}


def main() -> int:
    kv = zkv.serve()  # this process owns the store
    try:
        replies = kv.subscribe("replies")  # live before any worker can answer
        ctx = mp.get_context("spawn")  # fork and forkserver work the same way
        workers = [ctx.Process(target=worker, args=(f"w{i}",)) for i in range(WORKERS)]
        for proc in workers:
            proc.start()
        wait_for(lambda: kv.get("workers_ready") == WORKERS, 30, what="workers subscribed")

        orders = [make_order(i) for i in range(ORDERS)]
        for order in orders:
            kv.publish("orders", order)

        handled_by: dict[str, int] = {}
        for _ in range(ORDERS):
            order_id, name, total = replies.receive(timeout=30)
            handled_by[name] = handled_by.get(name, 0) + 1
            print(f"order {order_id:2} total {total:4} handled by {name}")
        replies.close()

        kv.publish("orders", {"type": "stop"})
        for proc in workers:
            proc.join(30)

        expected = sum(q * p for order in orders for q, p in order["items"])
        results = kv.get_many(f"order:{i}" for i in range(ORDERS))
        assert len(results) == ORDERS, "every order handled once"
        assert kv["revenue"] == expected == sum(r["total"] for r in results.values())
        assert all(proc.exitcode == 0 for proc in workers)
        print(f"{ORDERS} orders, revenue {expected}, handled per worker: "
              f"{dict(sorted(handled_by.items()))} (pid {os.getpid()} dispatched)")
        return 0
    finally:
        kv.close()


if __name__ == "__main__":
    raise SystemExit(main())
