#!/usr/bin/env bash
# Every result of this project, regenerated on the current code with one command: each study's runs,
# then the figures, then every generated block of the README and of benchmark/*.md
# (benchmark/results.py). The studies use the 3-seed pipeline's seed-1 SFT model and reward
# model, so the pipeline runs first; the annotator sweep uses its three SFT models.
#
#     bash benchmark/run_all.sh                  # several hours on 2 cores; prints each study's wall time
#     STUDIES="pipeline annotator" bash benchmark/run_all.sh   # some studies only (then the pages)
#
# Each study also runs alone (benchmark/<study>.sh); a finished run (one with summary.json) is skipped,
# so a rerun resumes where it stopped. The figures need matplotlib (pip install -r benchmark/requirements.txt).
# runs/bench/commits.log records the commit (and whether tracked files had changes) of every start.
set -euo pipefail
cd "$(dirname "$0")/.."
B=runs/bench
STUDIES=${STUDIES:-quickstart pipeline ddp annotator golden_length overoptimization stability rrhf length}
export SFT=$B/pipeline/sft_s1 RM=$B/pipeline/reward_model_s1
mkdir -p "$B"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- '*.py' '*.sh' || echo ' (with uncommitted changes)') $STUDIES" \
    >> "$B/commits.log"

start=$SECONDS
for study in $STUDIES; do
    t=$SECONDS
    echo "$(date +%T) $study"
    case $study in
        pipeline) OUT=$B/pipeline bash benchmark/pipeline.sh ;;
        annotator) OUT=$B/annotator SFTS=$B/pipeline bash benchmark/annotator.sh ;;
        stability) OUT=$B bash benchmark/stability.sh ;;
        overoptimization) OUT=$B/overopt bash benchmark/overoptimization.sh ;;
        *) OUT=$B/$study bash "benchmark/$study.sh" ;;
    esac > "$B/$study.out" 2>&1 || { echo "$study failed: see $B/$study.out"; exit 1; }
    echo "$(date +%T) $study done in $(( (SECONDS - t) / 60 )) min" | tee -a "$B/timing.log"
done

if python -c "import matplotlib" 2>/dev/null; then
    python benchmark/report.py curves $B/pipeline --only ppo ppo_max rcfd length_ppo --out benchmark/figures/pipeline.png --smooth 3
    python benchmark/report.py curves $B/stability --out benchmark/figures/stability.png --smooth 3
    python benchmark/report.py curves $B/overopt --out benchmark/figures/overoptimization.png --smooth 3
else
    echo "matplotlib is not installed: the figures were not redrawn (pip install -r benchmark/requirements.txt)"
fi
python benchmark/results.py README.md benchmark/*.md
echo "all studies: $(( (SECONDS - start) / 60 )) min" | tee -a "$B/timing.log"
