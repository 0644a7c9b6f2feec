"""A pool worker that starts only once its parent is gone (`python -m orphaned_worker '<config>'`), for a test of
a parent that dies before its worker's parent-watch begins. It waits for the death of the process HOLDER_PID (in
its environment) that started it, so it waits the same way whether or not its config names its parent."""

import os
import sys
import time

from thaw_format.sdk import pool_worker

holder = int(os.environ["HOLDER_PID"])
while os.getppid() == holder:
    time.sleep(0.05)
sys.exit(pool_worker.main(sys.argv))
