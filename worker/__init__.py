"""FlexLLM."""

import os

# OpenMP threads that wait for work sleep instead of spinning. On a CPU shared with other processes a
# spinning thread burns the core its partner needs, and every parallel region then waits for a
# descheduled thread: measured here with 2 threads beside other busy processes (load 8 on 2 cores),
# a 128-token prefill took 11.6 s spinning and 1.2 s passive. Set before torch loads OpenMP (the
# worker's entry points import this package first); an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
