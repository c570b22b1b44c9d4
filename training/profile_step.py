"""Where a training step's time goes: each phase's wall time and the cores it kept busy.

Runs the training loop's own step (``training.train.train_step``, on the batches the loop
reads) with a stopwatch for a few steps after a warm-up and prints a markdown table
(docs/model_card.md, *Training step time*). Every flag of ``scripts/train.py`` applies:

    nice -n 19 python -m training.profile_step --image-size 512 --steps 8
    nice -n 19 python -m training.profile_step --image-size 256 --autocast none --ops 20

The minimum over steps is the figure to quote on a shared machine: other processes only
ever add time. ``--ops N`` also profiles one step with ``torch.profiler`` and lists the N
operators with the most self time, and how much of the step ran outside any operator
(Python and the dispatcher).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .augment import batch_for_step, step_indices
from .shards import ShardDataset, render
from .stopwatch import Stopwatch
from .train import Prepared, TrainConfig, config_from_args, prepare, step_generator, train_step

STEP = "step"
"""The whole step's row in the timings, beside the phases."""


@dataclass(frozen=True)
class ProfileConfig:
    """What to profile: a training configuration and how many steps to time."""

    train: TrainConfig
    steps: int = 8
    warmup: int = 2
    ops: int = 0


def _batches(config: TrainConfig, run: Prepared, watch: Stopwatch):
    """The loop's batches and generators, step by step, each read under phase ``data``."""
    dataset = ShardDataset(render(config.data, Path(config.data_root)))
    mean, std = run.sam.pixel_mean.cpu(), run.sam.pixel_std.cpu()
    step = 0
    while True:
        with watch.phase("data"):
            g = step_generator(config.seed, step)
            indices = step_indices(step, len(dataset), config.images_per_step, config.seed)
            batch = batch_for_step(dataset, indices, mean, std, config.augment, g)
        yield batch, g
        step += 1


def time_steps(config: ProfileConfig) -> dict[str, list[tuple[float, float]]]:
    """Wall and CPU seconds of every phase in each of ``config.steps`` timed steps.

    Arguments:
      config (ProfileConfig): the training settings and the number of steps.
    Returns:
      (dict): phase -> one (wall, cpu) pair per timed step; ``data`` is reading and
        augmenting the step's images, ``STEP`` the whole step, the rest as ``train_step``
        and ``training.step`` name them.
    """
    run = prepare(config.train)
    watch = Stopwatch()
    batches = _batches(config.train, run, watch)
    timings: dict[str, list[tuple[float, float]]] = {}
    for step in range(config.warmup + config.steps):
        wall, cpu = time.perf_counter(), time.process_time()
        batch, g = next(batches)
        train_step(run, batch, g, config.train, watch)
        phases = watch.lap()
        phases[STEP] = (time.perf_counter() - wall, time.process_time() - cpu)
        if step >= config.warmup:
            for name, value in phases.items():
                timings.setdefault(name, []).append(value)
    return timings


def table(timings: dict[str, list[tuple[float, float]]]) -> str:
    """A markdown table of ``time_steps``'s result: per phase the minimum and median wall
    milliseconds, the share of the step's minimum and the cores busy (CPU / wall).

    Arguments:
      timings (dict): phase -> (wall, cpu) seconds per step.
    Returns:
      (str): the table, phases in the order the step runs them, ``other`` (the step's time
        outside every phase) and the step last.
    """
    rows = {name: values for name, values in timings.items() if name != STEP}
    step = timings[STEP]
    outside = [
        (s[0] - sum(v[i][0] for v in rows.values()), s[1] - sum(v[i][1] for v in rows.values()))
        for i, s in enumerate(step)
    ]
    rows["other"] = outside
    rows[STEP] = step
    total = min(wall for wall, _ in step)
    lines = [
        "| phase | min ms | median ms | share of min step | cores busy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, values in rows.items():
        walls = [wall for wall, _ in values]
        cores = sum(cpu for _, cpu in values) / max(sum(walls), 1e-9)
        lines.append(
            f"| {name} | {1000 * min(walls):.1f} | {1000 * statistics.median(walls):.1f} "
            f"| {100 * min(walls) / total:.0f} % | {cores:.2f} |"
        )
    median = statistics.median(wall for wall, _ in step)
    lines.append(f"\nsteps/s: {1 / total:.3f} at the best step, {1 / median:.3f} at the median")
    return "\n".join(lines)


def operator_table(config: ProfileConfig) -> str:
    """``torch.profiler``'s top ``config.ops`` operators by self time over one step (after
    a warm-up), and the share of the step spent outside any operator.

    Arguments:
      config (ProfileConfig): the training settings; ``ops`` rows are listed.
    Returns:
      (str): the profiler's table and one line on the time outside operators.
    """
    from torch.profiler import ProfilerActivity, profile

    run = prepare(config.train)
    batches = _batches(config.train, run, Stopwatch(enabled=False))
    for _ in range(config.warmup):
        train_step(run, *next(batches), config.train)
    batch, g = next(batches)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        train_step(run, batch, g, config.train)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    in_ops = sum(event.self_cpu_time_total for event in events) / 1e6
    text = events.table(sort_by="self_cpu_time_total", row_limit=config.ops)
    return (
        f"{text}\nstep {wall:.3f} s under the profiler; operators' self time {in_ops:.3f} s; "
        f"outside operators (Python, dispatch) {max(wall - in_ops, 0.0):.3f} s"
    )


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--steps``, ``--warmup``, ``--ops`` and any ``scripts/train.py`` flag."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--ops", type=int, default=0, help="also list the top N operators")
    args, rest = parser.parse_known_args(argv)
    train = config_from_args(rest)
    config = ProfileConfig(train, args.steps, args.warmup, args.ops)
    print(f"{train}\nload average before: {os.getloadavg()}", flush=True)
    print(table(time_steps(config)), flush=True)
    if config.ops:
        print(operator_table(config), flush=True)
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
