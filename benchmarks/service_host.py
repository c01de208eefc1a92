"""``python -m benchmarks.service_host CONFIG.json``: the worker service for the
service benchmark, in its own process (so the load generator's threads do
not share its GIL).

The same :class:`worker.service.WorkerService` that ``vault worker serve``
runs, with the same hardened worker processes; only the key release is
skipped (the package key comes from CONFIG through the test-only pipe), which
changes nothing once the workers run. Prints one JSON ready line.
"""

from __future__ import annotations

import json
import sys


def main() -> int:
    from worker.service import AllowListPolicy, LaunchSpec, ServiceConfig, WorkerService

    cfg = json.loads(open(sys.argv[1]).read())
    keys = {p: bytes.fromhex(k) for p, k in cfg["keys"].items()}
    svc = WorkerService(
        ServiceConfig(
            bind="tcp://127.0.0.1:0",
            packages=list(keys),
            instances=cfg["instances"],
            max_batch=cfg["max_batch"],
            max_queue_delay_us=cfg["max_queue_delay_us"],
            instance_inflight=cfg.get("instance_inflight", 2),
            curve=(cfg["public"].encode(), cfg["secret"].encode()),
            policy=AllowListPolicy({"bench": cfg["client_public"]}),
            launch=LaunchSpec(publisher=cfg["publisher"], unsafe_test_keys=keys,
                              intra_op_threads=cfg["intra_op_threads"]),
        )
    )  # fmt: skip
    ready = svc.start()
    print(json.dumps({"endpoint": ready["endpoint"]}), flush=True)
    return svc.run()


if __name__ == "__main__":
    sys.exit(main())
