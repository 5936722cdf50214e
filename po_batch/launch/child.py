"""An engine process of the local launcher (launch/local.py): reads its job, one JSON line, from stdin and runs the
worker; a later line (the launcher's signal, forwarded) or the end of stdin (the launcher is gone) asks it to stop.
    python -m po_batch.launch.child < job"""

import json
import sys
import threading
import traceback

from po_batch.stop import Stop, ignore_usr1_at_exit, unblock

ignore_usr1_at_exit()  # an engine process's teardown is as long as the CLI's


def main() -> int:
    stop = Stop()
    stop.install()  # before the imports below: a signal meanwhile must not be its default action
    unblock()  # the launcher started us with them blocked: one that came while Python started is heard now
    job = json.loads(sys.stdin.readline())

    def watch():
        for line in sys.stdin:
            stop.request(line.strip() or "the launcher's request")
        stop.request("the launcher is gone")

    threading.Thread(target=watch, name="po-batch-launcher", daemon=True).start()
    from po_batch import worker
    from po_batch.config import config_from_dict

    slot = worker.Slot(job["labels"], job["cores"], display=False, name=job["name"])
    try:
        return worker.run(config_from_dict(job["config"]), shard=job["shard"] and tuple(job["shard"]),
                          config_path=job["config_path"], slot=slot, stop=stop)
    except worker.USER_ERRORS as e:
        print(f"po-batch: {job['name']}: {e}", file=sys.stderr, flush=True)
        return worker.EXIT_USAGE
    except Exception as e:  # committed units stay committed; the launcher reports this process's exit
        traceback.print_exc()
        print(f"po-batch: {job['name']}: the engine process failed ({type(e).__name__}: {e})", file=sys.stderr,
              flush=True)
        return worker.EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
