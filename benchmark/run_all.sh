#!/usr/bin/env bash
# Every result of this project, regenerated on the current code with one command: each study's runs (the pipeline
# first: the others use its seed-1 SFT and reward model; the speed study last, skipped without TRL's environment),
# the figures (matplotlib: pip install -r benchmark/requirements.txt), then every generated block of the README and of
# benchmark/*.md (benchmark/results.py). A finished run is skipped, so a rerun resumes where it stopped.
#
#     bash benchmark/run_all.sh                                # each study's wall time also in runs/bench/timing.log
#     STUDIES="pipeline annotator" bash benchmark/run_all.sh   # some studies only (then the pages)
#
# runs/bench/commits.log records the commit each study started at, for the results pages.
source "$(dirname "$0")/lib.sh"
B=runs/bench
STUDIES=${STUDIES:-quickstart pipeline ddp annotator golden_length overoptimization stability rrhf length speed}
export SFT=$B/pipeline/sft_s1 RM=$B/pipeline/reward_model_s1
mkdir -p "$B"

start=$SECONDS
for study in $STUDIES; do
    if [ "$study" = speed ] && [ ! -x /tmp/trl-venv/bin/python ]; then
        echo "speed: skipped, no TRL environment at /tmp/trl-venv (benchmark/RESULTS.md's speed section makes one)"
        continue
    fi
    t=$SECONDS
    echo "$(date +%T) $study"
    changes=$([ -z "$(git status --porcelain -- '*.py' '*.sh')" ] || echo ' (with uncommitted changes)')
    echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD)$changes $study" >> "$B/commits.log"
    case $study in
        pipeline) OUT=$B/pipeline bash benchmark/pipeline.sh ;;
        annotator) OUT=$B/annotator SFTS=$B/pipeline bash benchmark/annotator.sh ;;
        stability) OUT=$B bash benchmark/stability.sh ;;
        overoptimization) OUT=$B/overopt bash benchmark/overoptimization.sh ;;
        *) OUT=$B/$study bash "benchmark/$study.sh" ;;
    esac > "$B/$study.out" 2>&1 || { echo "$study failed: see $B/$study.out"; exit 1; }
    echo "$(date +%T) $study done in $(( (SECONDS - t) / 60 )) min" | tee -a "$B/timing.log"
done

figure() {  # figure STUDY_FOLDER PNG [report.py flags]: drawn when the study is there
    [ -d "$1" ] && python benchmark/report.py curves "$1" --out "benchmark/figures/$2" --smooth 3 "${@:3}"
    return 0
}
if python -c "import matplotlib" 2>/dev/null; then
    figure $B/pipeline pipeline.png --only ppo ppo_max rcfd length_ppo
    figure $B/stability stability.png
    figure $B/overopt overoptimization.png
else
    echo "matplotlib is not installed: the figures were not redrawn (pip install -r benchmark/requirements.txt)"
fi
echo "all studies: $(( (SECONDS - start) / 60 )) min" | tee -a "$B/timing.log"
# the pages last; a block whose study has not run (yet) is kept as it was, and named
python benchmark/results.py README.md benchmark/*.md || echo "some generated blocks were not regenerated (above)"
