"""Entrypoint for `ray job submit ... -- python jobs/sweep.py --config jobs/configs/smoke.yaml`.

Inside a Ray job RAY_ADDRESS is set, so raybench joins the cluster instead of starting Ray.
A bad config exits 2 with the field error in `ray job logs`, before any worker starts.
"""

import sys

from raybench.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
