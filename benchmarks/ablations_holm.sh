#!/usr/bin/env bash
# Every `cadis analyze` family of benchmarks/ablations.sh again, from the committed records,
# with --correct holm: each run's p-values (all radii x all arms of the run) adjusted as one
# family, the Holm p beside the raw one. Seconds a family, no training or certification.
#   benchmarks/ablations_holm.sh [ABLATIONS] > docs/ablations/holm.md
set -euo pipefail
cadis=.venv/bin/cadis
A=${1:-docs/ablations}
folder() { echo "$A/$(awk -F'\t' -v name="$1" '$1 == name {print $3}' "$A/arms.tsv")"; }
radii=$(.venv/bin/python -c "import json; print(','.join(str(r) for r in json.load(open('$A/arms/off_the_shelf/summary.json'))['radii']))")
family() {  # NAME ARM...: each ARM against the first
    local name=$1 arm folders=()
    shift
    for arm in "$@"; do folders+=("$(folder "$arm")"); done
    printf '## %s\n\n' "$name"
    "$cadis" analyze "${folders[@]}" --labels "$@" --radii "$radii" --correct holm
    printf '\n'
}
family threshold recipe tau0.0 tau0.5 tau0.7 tau0.9
family scorer recipe argmax_frozen tau0.5_frozen tau0.7_frozen tau0.9_frozen
family lora_rank recipe rank1 rank16 full
family budget denoised_ce recipe denoised_ce_1.6x_steps denoised_ce_equal_time
family equal_time denoised_ce_equal_time recipe
family reference_recipe recipe layer_decay grad_clip wd_schedule drop_path lora_scale1 \
    reference_all
printf '## off_the_shelf\n\n'
"$cadis" analyze "$A/arms/off_the_shelf" "$(folder recipe)" "$(folder denoised_ce)" \
    "$(folder denoised_ce_equal_time)" "$(folder full)" --labels off-the-shelf recipe \
    denoised_ce denoised_ce_equal_time full --radii "$radii" --correct holm
printf '\n'
family frozen_vs_live_argmax recipe argmax_frozen
for tau in 0.5 0.7 0.9; do family "frozen_vs_live_$tau" "tau$tau" "tau${tau}_frozen"; done
