"""Fault-injection operators for the reliability tests, loaded as plugins (`fault_ops:Class`).

They keep every row (so outputs can be compared with an unfaulted run) and misbehave on purpose:
`CrashOnce` kills its worker process the first time it runs while a flag file exists; `SlowKeep`
sleeps per batch so a test can kill the driver mid-job."""

from __future__ import annotations

import os
import time

from operators.base import Operator, Verdict


class CrashOnce(Operator):
    name = "crash_once"

    def __init__(self, flag: str):
        self.flag = flag

    def __call__(self, table):
        try:
            os.remove(self.flag)  # only the first caller wins the flag, and dies
        except FileNotFoundError:
            return Verdict.keep_all(table.num_rows)
        os._exit(1)


class SlowKeep(Operator):
    name = "slow_keep"

    def __init__(self, seconds: float = 0.5):
        self.seconds = seconds

    def __call__(self, table):
        time.sleep(self.seconds)
        return Verdict.keep_all(table.num_rows)
