#!/usr/bin/env bash
# The README's science table at one sigma: the off-the-shelf pair, denoised fine-tuning and
# FT-CADIS, the fine-tuned arms each chosen by its staged sweep on validation (the sweep
# file's recipe as incumbent, paired verdicts, racing), its finalists and incumbent each
# trained with 3 seeds and certified on the test set; then `cadis analyze` pairs every seed of
# both arms with the off-the-shelf pair, Holm-corrected over the family, on the same 1,000
# test images and the same noise draws: ONE store of test draws (draws/test-*) serves the
# off-the-shelf pair and both sweeps' final stages, and the two sweeps share their other
# stores too (draws_dir): the second denoises nothing.
#
#   benchmarks/science.sh SIGMA [OUT]        # OUT: runs/science/sigmaSIGMA
#
# Every arm certifies every 10th test image (1,000), sequentially at n at most 1,000, n0 = 100,
# alpha = 0.001, seed 0. The sweeps have two objectives, certified accuracy at r = SIGMA and
# at r = 0 on validation (the first chooses; the second keeps the search and the verdicts
# looking at clean accuracy). One torch thread per process; the off-the-shelf pair (no Ray)
# builds the test store beside the sweeps and certifies from it. Each step resumes (a
# finished one is skipped) when the script is run again.
#
# Two sweeps at once need one Ray: two local Rays on one machine break Ray Train's
# placement-group cleanup ("Found multiple active Ray instances"). With RAY_ADDRESS set (a
# `ray start --head`; its RAY_AUTH_MODE too), the two run side by side (builders of one store
# take turns: whichever comes second opens what the first built); without it, one after the
# other.
#
# A final stage that did not finish leaves in its committed records what its further seeds
# need (the sweep file, the race's choice, the chosen trial's config):
# benchmarks/science_seeds.py makes them with the stage's own retraining and certification.
set -euo pipefail
sigma=${1:?usage: benchmarks/science.sh SIGMA [OUT]}
out=${2:-runs/science/sigma$sigma}
cadis=${CADIS:-.venv/bin/cadis}
python=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
store="sqlite:///$(cd "$out" && pwd)/mlflow.db"
radius=$(python3 -c "print(float('$sigma'))")

sweep() {  # ARM
    local resume
    resume=$(test -f "$out/$1/sweep.json" && echo --resume || true)
    "$cadis" sweep "sweeps/science_$1.yaml" $resume --set "sigma=$sigma" \
        --set "objective.metric=[certified_accuracy_r$radius, certified_accuracy_r0.0]" \
        --set "results_dir=$out/$1" --set "draws_dir=$out/draws" \
        --set "mlflow.tracking_uri=$store" \
        --set "mlflow.experiment=science-$1-sigma$sigma" 2>&1 | tee -a "$out/$1.log"
}
"$cadis" certify --models models/fashion-mnist --sigma "$sigma" --n 1000 --n0 100 \
    --alpha 0.001 --skip 10 --max-images 1000 --sequential --seed 0 --quiet \
    --draws-dir "$out/draws" --out "$out/off_the_shelf" &
pair=$!
failed=0
if [ -n "${RAY_ADDRESS:-}" ]; then
    sweep ft_cadis & ft=$!
    sweep denoised_ce & ce=$!
    wait $ft || failed=1
    wait $ce || failed=1
else
    sweep ft_cadis && sweep denoised_ce || failed=1
fi
wait $pair || failed=1
[ $failed = 0 ] || { echo "science: a step failed; run the script again to resume" >&2; exit 1; }

seeds() {  # ARM: "ARM@SEED FOLDER" per training seed of the trial the sweep chose (its
    # sweep.json names it; the final stage certified it with every seed on the test store)
    "$python" -c "
import sys
from cadis.sweeps.final_stage import seed_figures
from cadis.sweeps.layout import SweepState
arm, results = sys.argv[1:]
state = SweepState.read(results)
if state.chosen_trial is None:
    sys.exit(f'science: {results} names no chosen trial (stage {state.stage})')
for seed, entry in seed_figures(results, [state.chosen_trial])[state.chosen_trial]['seeds'].items():
    print(f'{arm}@{seed}', entry['folder'])" "$1" "$out/$1"
}
# The radii the sequential test decided (n = 1,000 reaches 2.46 sigma): beyond them all are 0.
radii=$(python3 -c "import json; print(','.join(str(r) for r in json.load(open('$out/off_the_shelf/summary.json'))['radii']))")
arms=$(seeds denoised_ce && seeds ft_cadis)
labels=$(cut -d' ' -f1 <<<"$arms")
folders=$(cut -d' ' -f2 <<<"$arms")
# Each arm's mean over its training seeds against the off-the-shelf pair, then FT-CADIS's
# against denoised fine-tuning's; Holm over every arm and radius of each command.
"$cadis" analyze "$out/off_the_shelf" $folders --labels off-the-shelf $labels \
    --baseline off-the-shelf --over-seeds --correct holm --radii "$radii" \
    --plot "$out/sigma$sigma.png" | tee "$out/analyze.md"
"$cadis" analyze $folders --labels $labels --baseline denoised_ce --over-seeds \
    --correct holm --radii "$radii" | tee "$out/analyze-vs-denoised_ce.md"
# Every trial of each sweep (stopped ones too) with its searched values and figures, from MLflow.
for arm in denoised_ce ft_cadis; do
    "$cadis" compare --experiment "science-$arm-sigma$sigma" --tracking-uri "$store" \
        --format csv > "$out/$arm/trials.csv"
done
