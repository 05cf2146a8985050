"""Peak resident memory of this process and its children together, for benchmarks of renders that start child
processes (the mask reader and the TIFF encoder of large images): their peaks do not coincide, so neither this
process's VmHWM nor the largest child's ru_maxrss says what the machine had to hold at once.

    with TreePeakRss() as peak:
        render(...)
    print(peak.kib, peak.own_kib)   # highest sampled sum; this process's own VmHWM
"""

from __future__ import annotations

import glob
import re
import threading


def _rss_kib(pid: str, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1))
    except (OSError, AttributeError):  # a child that just exited
        return 0


class TreePeakRss:
    """Samples the RSS of this process plus its children every `interval` seconds (Linux /proc)."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.kib, self.own_kib = interval, 0, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self.interval):
            children = set()
            for path in glob.glob("/proc/self/task/*/children"):  # each thread's children
                with open(path) as listing:
                    children.update(listing.read().split())
            self.kib = max(self.kib, _rss_kib("self") + sum(_rss_kib(pid) for pid in children))

    def __enter__(self) -> TreePeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.own_kib = _rss_kib("self", "VmHWM")
        self.kib = max(self.kib, self.own_kib)
