"""Configuration reload with watch: a worker keeps its settings fresh without polling.

The worker watches the "config." keys first, then reads them: a change made after the watch
started is never missed, and one made just before is applied twice, which does no harm
(events carry the whole new value). Every process sees the changes in the same order.
"""

import multiprocessing as mp

import zkv


def worker():
    kv = zkv.store()
    changes = kv.watch(prefix="config.")  # live when it returns
    config = {k: v for k, v in kv.get_all().items() if k.startswith("config.")}
    kv.publish("seen", config)
    for change in changes:  # zkv.Change(key, kind, value, version)
        if change.kind == "set":
            config[change.key] = change.value
        else:
            config.pop(change.key, None)
        kv.publish("seen", dict(config))
        if config.get("config.stop"):
            break
    changes.close()


if __name__ == "__main__":
    kv = zkv.store()
    kv.set_many({"config.rate": 3, "config.mode": "plain"})
    with kv.subscribe("seen") as seen:
        process = mp.Process(target=worker)
        process.start()
        print("start: ", seen.receive(timeout=30))
        kv.set("config.rate", 5)
        print("reload:", seen.receive(timeout=30))
        kv.delete("config.mode")
        print("reload:", seen.receive(timeout=30))
        kv.set("config.stop", True)
        seen.receive(timeout=30)
        process.join(30)
    print(f"worker exited with {process.exitcode}")
