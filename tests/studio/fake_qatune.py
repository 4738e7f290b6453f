"""Stands in for `python -m qatune` in the studio's fuzz tests: a job's process without torch, so thousands of
jobs cost milliseconds each. It prints its arguments, lives a moment, and exits as the CLI does (0 when done,
130 on Ctrl-C). Its command line carries the word `qatune` (the JobRunner's argument before the job's), which
is how the studio tells its jobs from a reused process id."""

import signal
import sys
import time

signal.signal(signal.SIGINT, lambda *_: sys.exit(130))
print("qatune", *sys.argv[2:], flush=True)
time.sleep(0.5)
