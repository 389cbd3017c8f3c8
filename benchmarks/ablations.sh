#!/usr/bin/env bash
# docs/ablations/: the sweeps of sweeps/ablations.yaml and sweeps/reference_recipe.yaml (every
# arm trained, ranked on validation and certified once on the same 1,000 test images and noise
# draws), the off-the-shelf pair on those images and draws, then `cadis analyze` of each family
# of arms against the recipe, with McNemar's exact p and a paired bootstrap interval per
# radius, and its plot.
#
#   benchmarks/ablations.sh [OUT]        # OUT: runs/ablations; resumes when run again
#
# The off-the-shelf pair is certified beside the first sweep's start: it denoises the test
# draws into the store both sweeps' final stages then read (one build, whoever comes first).
# The second sweep trains on the first one's stores. One torch thread per process.
set -euo pipefail
out=${1:-runs/ablations}
cadis=${CADIS:-.venv/bin/cadis}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
store="sqlite:///$(cd "$out" && pwd)/mlflow.db"

sweep() {  # NAME: sweeps/NAME.yaml into OUT/NAME, on the shared stores
    local resume
    resume=$(test -f "$out/$1/sweep.json" && echo --resume || true)
    "$cadis" sweep "sweeps/$1.yaml" $resume --set "results_dir=$out/$1" \
        --set "draws_dir=$out/draws" --set "certify.final.draws_dir=$out/test-draws" \
        --set "mlflow.tracking_uri=$store"
}
if [ ! -f "$out/off_the_shelf/summary.json" ]; then
    "$cadis" certify --models models/fashion-mnist --sigma 0.5 --n 1000 --n0 100 --alpha 0.001 \
        --skip 10 --max-images 1000 --sequential --seed 0 --quiet \
        --draws-dir "$out/test-draws" --out "$out/off_the_shelf" & pair=$!
fi
sweep ablations
sweep reference_recipe
[ -z "${pair:-}" ] || wait $pair
# Denoised CE at FT-CADIS's wall time: with stored draws an FT-CADIS step (the scorer's
# forward, the attack, the adversarial term) costs about 3.5 denoised-CE steps here (the first
# sweep's epoch_seconds: 140 s against 40 s for 3 epochs of 60 steps). 218 steps an epoch
# (3.6x) came from a first reading of those times that counted the last epoch twice (187 s
# against 52 s): the arm trains about 4% more than FT-CADIS's time would buy.
# One run in this process, on the first sweep's stores, certified as the sweeps' final stage
# certifies, on the same test draws (`cadis train` reads the base only: its certify is set here).
if [ ! -f "$out/denoised_ce_equal_time/certify_epoch_003/summary.json" ]; then
    resume=$(test -d "$out/denoised_ce_equal_time" && echo --resume || true)
    "$cadis" train sweeps/ablations.yaml $resume --quiet --set method=denoised_ce \
        --set lora_rank=2 --set max_steps_per_epoch=218 \
        --set "train_store=$(ls -d "$out"/draws/train-*)" \
        --set "proxy_store=$(ls -d "$out"/draws/proxy-*)" \
        --set certify.skip=10 --set certify.max_images=1000 --set certify.sequential=true \
        --set "certify.draws_dir=$out/test-draws" --out "$out/denoised_ce_equal_time"
fi

# Each arm's test folder, by the name of what it changes (arms.tsv: name, trial, folder,
# training seconds).
.venv/bin/python benchmarks/ablation_arms.py "$out/ablations" "$out/reference_recipe" \
    "$out/denoised_ce_equal_time" > "$out/arms.tsv"
folder() { awk -F'\t' -v name="$1" '$1 == name {print $3}' "$out/arms.tsv"; }
radii=$(.venv/bin/python -c "import json; print(','.join(str(r) for r in json.load(open('$out/off_the_shelf/summary.json'))['radii']))")

family() {  # NAME ARM...: each ARM against the first, the recipe; OUT/NAME.md and .png
    local name=$1 arm folders=()
    shift
    for arm in "$@"; do folders+=("$(folder "$arm")"); done
    "$cadis" analyze "${folders[@]}" --labels "$@" --radii "$radii" \
        --plot "$out/$name.png" | tee "$out/$name.md"
}
family threshold recipe tau0.0 tau0.5 tau0.7 tau0.9
family scorer recipe argmax_frozen tau0.5_frozen tau0.7_frozen tau0.9_frozen
family lora_rank recipe rank1 rank16 full
family budget denoised_ce recipe denoised_ce_1.6x_steps denoised_ce_equal_time
"$cadis" analyze "$(folder denoised_ce_equal_time)" "$(folder recipe)" \
    --labels denoised_ce_equal_time recipe --radii "$radii" | tee "$out/equal_time.md"
family reference_recipe recipe layer_decay grad_clip wd_schedule drop_path lora_scale1 \
    reference_all
# Against the off-the-shelf pair: the recipe, denoised CE at equal steps and time, full
# fine-tuning.
"$cadis" analyze "$out/off_the_shelf" "$(folder recipe)" "$(folder denoised_ce)" \
    "$(folder denoised_ce_equal_time)" "$(folder full)" --labels off-the-shelf recipe \
    denoised_ce denoised_ce_equal_time full --radii "$radii" --plot "$out/off_the_shelf.png" \
    | tee "$out/off_the_shelf.md"
# The frozen scorer against the live one at each threshold.
for tau in argmax 0.5 0.7 0.9; do
    if [ $tau = argmax ]; then live=recipe frozen=argmax_frozen
    else live=tau$tau frozen=tau${tau}_frozen; fi
    "$cadis" analyze "$(folder $live)" "$(folder $frozen)" --labels $live $frozen --radii "$radii"
done | tee "$out/frozen_vs_live.md"
