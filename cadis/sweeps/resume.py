"""Whether a sweep may start in, or ``--resume`` continue from, its ``results_dir``: a new
sweep finds no other sweep there, a resumed one finds its own saved state
(:class:`cadis.sweeps.layout.SweepState`) describing the very same sweep. "The same" is read
from the resolved sweep's fingerprint, leaf by leaf, so that a setting added to cadis since
the sweep began does not make it another sweep while it holds its default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Final, Mapping

from cadis.errors import CadisError
from cadis.finetuning.config import TrainConfig
from cadis.sweeps.layout import STATE_FILE, TUNE_NAME, SweepState
from cadis.sweeps.spec import RaceSettings, RankSettings, ResourceSettings, SweepConfig

# Said when a sweep begun before the incumbent existed would resume with one (the default
# with Optuna): it ran without one, and can resume only so.
INCUMBENT_HINT = "--set incumbent=false resumes a sweep begun without an incumbent"


def sweep_fingerprint(sweep: SweepConfig) -> dict[str, Any]:
    """The resolved sweep as plain data: a resumed sweep must be the same sweep."""
    data = dataclasses.asdict(sweep)
    data["base"] = sweep.base.to_dict()
    return _plain(data)


def check_results_dir(results: Path, fingerprint: dict[str, Any], resume: bool
                      ) -> SweepState | None:
    """The saved state of the sweep being resumed (None for a new sweep), after checking that
    ``results`` holds no other sweep (a new one) or this very sweep (a resumed one)."""
    state_path = results / STATE_FILE
    if not resume:
        if state_path.exists() or (results / TUNE_NAME).exists():
            raise CadisError(f"{results} already holds a sweep: pass --resume to continue it, "
                             f"or set results_dir (or remove the folder) to start anew")
        return None
    if not state_path.exists():
        raise CadisError(f"nothing to resume: {state_path} does not exist")
    state = SweepState.read(results)
    changed = resume_differences(state.sweep, fingerprint, setting_defaults())
    if changed:
        hint = (f"; {INCUMBENT_HINT}" if "incumbent" in changed and "incumbent" not in state.sweep
                else "")
        raise CadisError(f"the sweep differs from the one in {results} (in {', '.join(changed)}): "
                         f"resume it with the same file and --set values{hint}")
    # What a setting added since reads as, from now on.
    return dataclasses.replace(state, sweep=fingerprint)


#: A setting that an old sweep resumes the same under whatever value it now reads as.
ANY_SETTING: Final = "<any: restored as saved>"


def resume_differences(saved: Mapping[str, Any], now: Mapping[str, Any],
                       defaults: Mapping[str, Any]) -> list[str]:
    """The settings (dotted paths to the leaves) in which the sweep ``now`` differs from the
    ``saved`` one it would resume. A setting ``saved`` lacks was added to cadis after the sweep
    began; it ran as that setting's default, so it differs only if ``now`` holds another value
    (``defaults``: the same nesting, where a default is known)."""
    known = defaults if isinstance(defaults, Mapping) else {}
    changed = []
    for key in sorted(set(saved) | set(now)):
        if key not in saved:
            if key not in known or (known[key] is not ANY_SETTING and known[key] != now[key]):
                changed.append(key)
        elif key not in now:
            changed.append(key)
        elif isinstance(saved[key], Mapping) and isinstance(now[key], Mapping):
            changed += [f"{key}.{leaf}" for leaf in
                        resume_differences(saved[key], now[key], known.get(key, {}))]
        elif saved[key] != now[key]:
            changed.append(key)
    return changed


def setting_defaults() -> dict[str, Any]:
    """What a sweep begun before a setting existed ran as, nested as a fingerprint is: the
    setting's default where it has one of its own, and no incumbent (``incumbent``'s default
    depends on the searcher, and an Optuna sweep of old ran without one)."""
    base = TrainConfig().to_dict()
    sweep_fields = {field.name: field for field in dataclasses.fields(SweepConfig)}
    defaults: dict[str, Any] = _plain({
        "base": base, "certify": base["certify"],
        "final_seeds": sweep_fields["final_seeds"].default, "incumbent": False,
        "rank": dataclasses.asdict(RankSettings()), "race": dataclasses.asdict(RaceSettings()),
        "resources": dataclasses.asdict(ResourceSettings())})
    # Tune restores a sweep's searcher as it was saved, its sampler's settings with it: the
    # searcher settings a sweep begun before them reads as now change nothing it does.
    defaults["tpe"] = ANY_SETTING
    return defaults


def _plain(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` as it reads back from sweep.json (tuples as lists, other values as text): the
    form in which a saved fingerprint is compared."""
    return json.loads(json.dumps(data, default=str))
