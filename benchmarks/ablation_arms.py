"""The arms of benchmarks/ablations.sh: for each trial of the given sweep results folders, and
for each given `cadis train` output folder, the name of what it changes from the recipe, its
trial id (``-`` for a `cadis train` run), its test folder and the seconds its epochs' training
took, tab-separated.

    python benchmarks/ablation_arms.py runs/ablations/ablations runs/ablations/reference_recipe \
        runs/ablations/denoised_ce_equal_time
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cadis.sweeps.layout import CERTIFY_DIR, TRAINED_FILE, TRIALS_DIR, TrainedTrial

# The recipe's LoRA: rank 4, alpha 8 (scale 2).
RECIPE_RANK = 4
RECIPE_ALPHA = 8.0
RECIPE_STEPS = 60
# Denoised CE's steps an epoch at the recipe's wall time (benchmarks/ablations.sh says why).
EQUAL_TIME_STEPS = 218
# The reference recipe's settings (sweeps/reference_recipe.yaml): key, its value when off, name.
REFERENCE_SETTINGS = (("layer_decay", 1.0, "layer_decay"), ("grad_clip", None, "grad_clip"),
                      ("weight_decay_end", None, "wd_schedule"), ("drop_path", 0.0, "drop_path"))


def arm(config: dict[str, Any]) -> str:
    """The arm's name: what its config changes from the recipe (sweeps/ablations.yaml)."""
    if config["method"] == "denoised_ce":
        steps = config["max_steps_per_epoch"]
        if steps == RECIPE_STEPS:
            return "denoised_ce"
        if steps == EQUAL_TIME_STEPS:
            return "denoised_ce_equal_time"
        return f"denoised_ce_{steps / RECIPE_STEPS:.1f}x_steps"
    if config["finetune"] == "full":
        return "full"
    if config["lora_rank"] != RECIPE_RANK:
        return f"rank{config['lora_rank']}"
    changed = [name for key, off, name in REFERENCE_SETTINGS if config[key] != off]
    changed += ["lora_scale1"] if config["lora_alpha"] != RECIPE_ALPHA else []
    if changed:
        return changed[0] if len(changed) == 1 else "reference_all"
    tau = config["confidence_threshold"]
    frozen = config["confidence_model"] == "frozen" and tau != 0
    name = "argmax" if tau == "argmax" else f"tau{tau}"
    if frozen:
        return f"{name}_frozen"
    return "recipe" if tau == "argmax" else name


def epoch_seconds(results: Path, trial_id: str) -> float:
    """The sum of the trial's ``epoch_seconds`` over its epochs (Tune's results repeat the last
    epoch's metrics in the rank stage's report: one value per epoch counts)."""
    (result,) = results.glob(f"tune/run_trial_{trial_id}_*/result.json")
    reports = [json.loads(line) for line in result.read_text().splitlines()]
    return sum({report["epoch"]: report["epoch_seconds"] for report in reports}.values())


def sweep_arms(results: Path) -> list[tuple[str, str, Path, float]]:
    """A sweep's trials: (arm, trial id, test folder, training seconds)."""
    return [(arm(TrainedTrial.read(trained).config), trained.parent.name,
             trained.parent / CERTIFY_DIR, epoch_seconds(results, trained.parent.name))
            for trained in sorted(results.glob(f"{TRIALS_DIR}/*/{TRAINED_FILE}"))]


def train_arm(out: Path) -> tuple[str, str, Path, float]:
    """A `cadis train` run: its config, its last epoch's certification and its history."""
    history = json.loads((out / "history.json").read_text())
    folder = out / f"certify_epoch_{int(history[-1]['epoch']):03d}"
    return (arm(json.loads((out / "config.json").read_text())), "-", folder,
            sum(epoch["epoch_seconds"] for epoch in history))


def main(folders: list[str]) -> None:
    for given in map(Path, folders):
        for name, trial_id, folder, seconds in (
                sweep_arms(given) if (given / TRIALS_DIR).is_dir() else [train_arm(given)]):
            if not (folder / "summary.json").is_file():
                sys.exit(f"ablation_arms: {folder} has no test certification")
            print(name, trial_id, folder, f"{seconds:.1f}", sep="\t")


if __name__ == "__main__":
    main(sys.argv[1:])
