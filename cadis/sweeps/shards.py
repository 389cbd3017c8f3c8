"""Certification split across Ray tasks, so that no worker idles while one certifies.

A certification of K shards runs K tasks, the k-th certifying the k-th contiguous part of the
images into its own folder (``OUT/shards/k-of-K``); the parts then join into ``OUT``
(:func:`~cadis.smoothing.record_folder.merge_records`). Each image's noise has its own generator
and stored draws are fixed per image, so the joined records equal one task's but for the
``seconds`` column. Each part resumes on its own; a join that was cut short is redone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from cadis.smoothing.record_folder import merge_records

SHARDS_DIR: Final = "shards"
#: Measured of a run, not settings: the joined summary keeps each one's worst part (every
#: part checks the same draws, so the agreement and its draws are the same in each).
WORST_NOTES: Final = {"agreement_with_fp32": min, "agreement_draws": min,
                      "compile_seconds": max}

def shard_dirs(out: str | Path, shards: int) -> list[Path]:
    """The folders the parts of a certification into ``out`` write: ``out`` itself for one."""
    out = Path(out)
    if shards == 1:
        return [out]
    return [out / SHARDS_DIR / f"{part + 1}-of-{shards}" for part in range(shards)]


def submit_shards(task: Any, args: Sequence[Any], out: str | Path, shards: int) -> list[Any]:
    """Start ``task`` (a Ray remote function ``certify(*args, out, shard)``, ``shard`` being
    ``(k, K)`` or None for all images, returning the part's summary) on each part; the
    futures of their summaries, in part order."""
    return [task.remote(*args, str(folder), None if shards == 1 else (part, shards))
            for part, folder in enumerate(shard_dirs(out, shards))]


def join_shards(out: str | Path, summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The summary of the whole certification from its parts' summaries (in part order),
    joining the parts' records into ``out`` when there is more than one."""
    if len(summaries) == 1:
        return summaries[0]
    radii = [float(radius) for radius in summaries[0]["certified_accuracy"]]
    notes: dict[str, Any] = {"shards": len(summaries)}
    for name, worst in WORST_NOTES.items():
        if name in summaries[0]:
            notes[name] = worst(summary[name] for summary in summaries)
    return merge_records(out, shard_dirs(out, len(summaries)), None, radii, notes)


def certify_in_shards(task: Any, args: Sequence[Any], out: str | Path,
                      shards: int) -> dict[str, Any]:
    """:func:`submit_shards`, wait for all, :func:`join_shards`: the whole summary."""
    import ray

    return join_shards(out, ray.get(submit_shards(task, args, out, shards)))
