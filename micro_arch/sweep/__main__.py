"""A sweep worker process, as started by pool.run_pool: `python -m micro_arch.sweep '<json>'`."""

import json
import sys

from micro_arch.errors import MicroArchError
from micro_arch.sweep.config import load_sweep
from micro_arch.sweep.worker import run_worker


def main() -> int:
    job = json.loads(sys.argv[1])
    try:
        sweep = load_sweep(job["path"], job["overrides"], n_trials=job["n_trials"])
        run_worker(sweep, job["storage"], job["runs_root"], name=job["name"], index=job["index"])
    except MicroArchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
