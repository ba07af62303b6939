"""How the runs of one method are grouped into vmapped programs, on a fresh start and on resume
(a resumed run rejoins the group it was trained in). Used by :mod:`experiments.train`."""

from __future__ import annotations

from typing import Callable

from experiments.errors import CheckpointError
from experiments.runs import RunConfig, resolve_method

__all__ = ["group_size", "plan_groups"]


def _group_size(cfg: RunConfig, bench, n: int, method: str = "equal") -> int:
    """Runs per vmapped program: ``--parallel-seeds``, else all of them, except on CPU for
    convolutional models and for parameter-level methods (``method``), where K vmapped runs are
    slower than K runs one by one (docs/experiments.md, ``benchmarks/vmapped_seeds.py``)."""
    k = cfg.parallel_seeds
    if k is None:
        import jax
        one_by_one = not getattr(bench, "vmap_on_cpu", True) or resolve_method(method).level == "parameters"
        k = 1 if jax.default_backend() == "cpu" and one_by_one else 0
    return k if k > 0 else max(n, 1)


def _plan_groups(bench, runs: list, size: int, cfg: RunConfig, program, log,
                 finished: frozenset = frozenset(), *, restore: Callable) -> list:
    """The vmapped groups to train, in order.

    A run resumed from a checkpoint rejoins the group it was trained in (its checkpoint names
    the runs, in order), whatever ``--parallel-seeds`` says now: the same compiled program
    then continues the same runs. A run whose newest checkpoint is ahead of its group's (a
    kill between the per-run saves) is rolled back to the group's common step, and its newer
    checkpoints are removed (they are recomputed bit for bit). Runs without a recorded group
    (fresh runs, checkpoints of older versions) are grouped by start step, ``size`` at a time.
    """
    by_ident = {r.ident: r for r in runs}
    groups: list = []
    taken: set = set()
    for r in runs:
        if r.group is None or r.ident in taken:
            continue
        group = list(r.group)  # r's own record may be reset by a roll-back below
        done_elsewhere = [n for n in group if n not in by_ident and n in finished]
        missing = [n for n in group if n not in by_ident and n not in finished]
        if missing:
            raise CheckpointError(
                f"{bench.name} {r.name} was trained in one vmapped group with {', '.join(missing)} (checkpoint "
                f"{r.ckpt.directory / str(r.start)}); resume them together (the same --methods and --seeds) so the "
                "group keeps its compiled shape, or pass --overwrite to start over")
        members = [by_ident[n] for n in group if n in by_ident]
        other = [m for m in members if m.group is not None and m.group != group]
        if other:
            raise CheckpointError(
                f"{bench.name}: the checkpoints of {r.name} and {other[0].name} record different vmapped groups "
                f"({', '.join(group)} vs {', '.join(other[0].group)}); pass --overwrite to start over")
        while len({m.start for m in members}) > 1:
            common = min(m.start for m in members)
            for m in members:
                if m.start > common:
                    ahead = m.start
                    restore(bench, m, cfg, program, log, at_most=common)
                    gone = m.ckpt.discard_after(m.start)
                    log(f"{bench.name} {m.name}: rolled back from step {ahead} to step {m.start} to resume with its "
                        f"vmapped group ({', '.join(group)}); removed its checkpoints {gone}")
        if done_elsewhere and min(m.start for m in members) < cfg.steps:
            # only when a member's final checkpoint was lost after that member finished
            log(f"warning: {bench.name} {r.name}: its vmapped group's {', '.join(done_elsewhere)} finished "
                f"earlier; it resumes in a smaller group (training may then differ from an uninterrupted run "
                f"at float32 round-off; evaluation does not)")
        if len(members) > size:
            log(f"{bench.name}: {', '.join(group)} resume as the one vmapped group they were trained in "
                f"(--parallel-seeds now asks for groups of {size}), so that no number depends on the grouping")
        groups.append(members)
        taken.update(m.ident for m in members)
    by_start: dict = {}
    for r in runs:
        if r.ident not in taken:
            by_start.setdefault(r.start, []).append(r)
    for start_runs in by_start.values():
        for i in range(0, len(start_runs), size):
            groups.append(start_runs[i:i + size])
    return groups


group_size = _group_size
plan_groups = _plan_groups
