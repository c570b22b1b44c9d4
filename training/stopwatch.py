"""Wall and CPU time per named phase of a training step, for profiling the loop.

CPU time is the whole process's (every thread), so CPU / wall for a phase says how many
cores it kept busy: about 1 for Python and numpy, up to the thread count for torch ops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Stopwatch:
    """Sums wall and process-CPU seconds per phase name until ``lap`` reads and resets them.

    A disabled stopwatch (the training loop's default) only yields: no clock is read.
    """

    enabled: bool = True
    wall: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block as part of phase ``name``.

        Arguments:
          name (str): the phase the body's time is added to (phases may repeat in a step).
        """
        if not self.enabled:
            yield
            return
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - wall
            self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - cpu

    def lap(self) -> dict[str, tuple[float, float]]:
        """The phases timed since the last lap, and start a new one.

        Returns:
          (dict): phase name -> (wall seconds, process CPU seconds), in first-timed order.
        """
        out = {name: (self.wall[name], self.cpu[name]) for name in self.wall}
        self.wall, self.cpu = {}, {}
        return out


OFF = Stopwatch(enabled=False)
"""The stopwatch a step uses when nobody profiles it."""
