#!/usr/bin/env bash
# The README's science table at one sigma: the off-the-shelf pair, denoised fine-tuning and
# FT-CADIS, the fine-tuned arms each chosen by its staged sweep on validation and the
# chosen trial certified on the test set; then `cadis analyze` pairs the three on the same
# 1,000 test images and noise draws, each against the off-the-shelf pair and FT-CADIS against
# denoised fine-tuning. The two sweeps share their stores of denoised draws
# (draws_dir): the second denoises nothing.
#
#   benchmarks/science.sh SIGMA [OUT]        # OUT: runs/science/sigmaSIGMA
#
# Every arm certifies every 10th test image (1,000), sequentially at n at most 1,000, n0 = 100,
# alpha = 0.001, seed 0. The sweeps' objective is certified accuracy at r = SIGMA on
# validation. One torch thread per process; the off-the-shelf pair (no Ray) is certified
# beside the sweeps. Each step resumes (a finished one is skipped) when the script is run
# again.
#
# Two sweeps at once need one Ray: two local Rays on one machine break Ray Train's
# placement-group cleanup ("Found multiple active Ray instances"). With RAY_ADDRESS set (a
# `ray start --head`; its RAY_AUTH_MODE too), the two run side by side (builders of one store
# take turns: whichever comes second opens what the first built); without it, one after the
# other.
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
        --set "objective.metric=certified_accuracy_r$radius" \
        --set "results_dir=$out/$1" --set "draws_dir=$out/draws" \
        --set "mlflow.tracking_uri=$store" \
        --set "mlflow.experiment=science-$1-sigma$sigma"
}
"$cadis" certify --models models/fashion-mnist --sigma "$sigma" --n 1000 --n0 100 \
    --alpha 0.001 --skip 10 --max-images 1000 --sequential --seed 0 --quiet \
    --out "$out/off_the_shelf" &
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

chosen() {  # the test folder of the trial the sweep chose, as its sweep.json names it
    # (the incumbent and further training seeds are certified on test too: not a glob)
    "$python" -c "
import sys
from cadis.sweeps.layout import SweepState, trial_certify_dir
state = SweepState.read(sys.argv[1])
if state.chosen_trial is None:
    sys.exit(f'science: {sys.argv[1]} names no chosen trial (stage {state.stage})')
print(trial_certify_dir(sys.argv[1], state.chosen_trial))" "$out/$1"
}
# The radii the sequential test decided (n = 1,000 reaches 2.46 sigma): beyond them all are 0.
radii=$(python3 -c "import json; print(','.join(str(r) for r in json.load(open('$out/off_the_shelf/summary.json'))['radii']))")
denoised_ce=$(chosen denoised_ce)
ft_cadis=$(chosen ft_cadis)
"$cadis" analyze "$out/off_the_shelf" "$denoised_ce" "$ft_cadis" \
    --labels off-the-shelf denoised_ce ft_cadis --baseline off-the-shelf --radii "$radii" \
    --plot "$out/sigma$sigma.png" | tee "$out/analyze.md"
"$cadis" analyze "$denoised_ce" "$ft_cadis" --labels denoised_ce ft_cadis \
    --radii "$radii" | tee "$out/analyze-vs-denoised_ce.md"
