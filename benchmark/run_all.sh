#!/usr/bin/env bash
# Every result of this project, regenerated on the current code with one command: each study's runs (the pipeline
# first: the others use its seed-1 SFT and reward model; the speed study last, skipped without TRL's environment),
# the figures (matplotlib: pip install -r benchmark/requirements.txt), then every generated block of the README and of
# benchmark/*.md (benchmark/results.py). A finished run is skipped, so a rerun resumes where it stopped.
#
#     bash benchmark/run_all.sh                                # each study's wall time also in runs/bench/timing.log
#     STUDIES="pipeline annotator" bash benchmark/run_all.sh   # some studies only (then the pages)
#     bash benchmark/run_all.sh golden_length ddp              # these studies only, as set below; no pages
#
# runs/bench/commits.log records the commit each study started at. Each study is a function below (RESULTS.md's
# table of studies links to what it measures); OUT, SFT, RM, SEEDS, JOBS...: from the environment, else its defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
ALL="quickstart pipeline ddp annotator golden_length overoptimization stability rrhf length speed"

# run_once DIR COMMAND...: `COMMAND --output_dir DIR --overwrite`, its output in DIR.log, its wall and CPU time
# appended to time.log beside DIR (with GNU time). Skipped if DIR/summary.json exists; an unfinished run restarts.
run_once() {
    local dir=$1; shift
    [ -f "$dir/summary.json" ] && return 0
    mkdir -p "$(dirname "$dir")"
    echo "$(date +%T) start $dir"
    local timer=()
    [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "$(basename "$dir"): %e s wall, %U s user, %S s sys" \
        -a -o "$(dirname "$dir")/time.log")
    "${timer[@]}" "$@" --output_dir "$dir" --overwrite > "$dir.log" 2>&1 \
        || { echo "$dir failed: see $dir.log"; return 1; }
    echo "$(date +%T) done $dir"
}

# launch COMMAND...: COMMAND in the background, once fewer than $JOBS (default 2) launched ones still run;
# finish: wait for them all, then fail if one failed
LAUNCHED=()
launch() {
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do sleep 2; done
    "$@" & LAUNCHED+=($!)
}
finish() {
    local failed=0 pid
    for pid in "${LAUNCHED[@]}"; do wait "$pid" || failed=1; done
    LAUNCHED=()
    return $failed
}
run() {  # run NAME ARGS...: run_once "$OUT/NAME" python ARGS...
    local name=$1; shift
    run_once "$OUT/$name" python "$@"
}

# The README's quick start, timed: sft.py, reward_model.py and ppo.py, every default, all threads, alone on the machine.
quickstart() {
    OUT=${OUT:-runs/bench/quickstart}
    run sft sft.py
    run reward_model reward_model.py --model_name_or_path "$OUT/sft"
    run ppo ppo.py --sft_model_path "$OUT/sft" --reward_model_path "$OUT/reward_model"
    python benchmark/report.py quickstart "$OUT" | tee "$OUT/table.md"
}

# Every algorithm with every default, 3 seeds in parallel, one thread each: each seed's SFT and reward model, then PPO,
# PPO-max, RRHF, RCfD and length-only PPO from them. EPISODES=N: another budget for the PPO-style methods.
pipeline() {
    OUT=${OUT:-runs/bench/pipeline} SEEDS=${SEEDS:-1 2 3} JOBS=${JOBS:-3} EPISODES=${EPISODES:-}
    export OMP_NUM_THREADS=1
    seed_pipeline() {
        local s=$1
        run "sft_s$s" sft.py --seed "$s"
        run "reward_model_s$s" reward_model.py --seed "$s" --model_name_or_path "$OUT/sft_s$s"
        local models=(--seed "$s" --sft_model_path "$OUT/sft_s$s" --reward_model_path "$OUT/reward_model_s$s")
        local budget=(${EPISODES:+--total_episodes "$EPISODES"})
        run "ppo_s$s" ppo.py "${models[@]}" "${budget[@]}"
        run "ppo_max_s$s" ppo_max.py "${models[@]}" "${budget[@]}"
        run "rrhf_s$s" rrhf.py "${models[@]}"
        run "rcfd_s$s" rcfd.py "${models[@]}" "${budget[@]}"
        run "length_ppo_s$s" ppo.py "${models[@]}" "${budget[@]}" --reward length --target_length 30
    }
    for s in $SEEDS; do launch seed_pipeline "$s"; done
    finish
    python benchmark/report.py table "$OUT" --initial ppo --keys gold reward kl length well_formed wall_time \
        peak_memory_mb | tee "$OUT/table.md"
    python benchmark/report.py timing "$OUT" | tee -a "$OUT/table.md"
}

# One process against two under torchrun (DDP, then --fsdp), the same global batch; alone on the machine.
ddp() {
    OUT=${OUT:-runs/bench/ddp} SFT=${SFT:-runs/sft}
    FLAGS=(--sft_model_path "$SFT" --reward length --target_length 20 --total_episodes 1280 --eval_rows 64)
    run_once "$OUT/one_process_s1" python ppo.py "${FLAGS[@]}"
    run_once "$OUT/two_processes_s1" torchrun --standalone --nproc_per_node 2 ppo.py "${FLAGS[@]}"
    run_once "$OUT/two_processes_fsdp_s1" torchrun --standalone --nproc_per_node 2 ppo.py "${FLAGS[@]}" --fsdp
    python benchmark/report.py table "$OUT" --initial one_process --keys world_size length_error wall_time \
        peak_memory_mb | tee "$OUT/table.md"
    python benchmark/report.py timing "$OUT" | tee -a "$OUT/table.md"
}

# The annotator sweep: for each setting k,c,pairs and seed, a reward model from the pipeline's SFT model of that seed
# ($SFTS/sft_s<seed>, trained here if missing) on the relabeled pairs, then ppo.py.
annotator() {
    OUT=${OUT:-runs/bench/annotator} SFTS=${SFTS:-runs/bench/pipeline} SEEDS=${SEEDS:-1 2 3} JOBS=${JOBS:-2}
    SETTINGS=${SETTINGS:-2,0.1,4000 3,0.1,4000 3,0.12,4000 2.5,0.075,4000 3,0.1,8000}  # k,c,pairs
    export OMP_NUM_THREADS=1
    for s in $SEEDS; do  # the SFT models first, as the pipeline study trains them
        launch run_once "$SFTS/sft_s$s" python sft.py --seed "$s"
    done
    finish
    setting() {  # setting SEED K C PAIRS: the reward model, then PPO on it
        local s=$1 name="k$2_c$3_n$4"; shift
        local sft="$SFTS/sft_s$s" rm="$OUT/rm_${name}_s$s"
        run "rm_${name}_s$s" benchmark/annotator.py "$@" reward_model.py --seed "$s" --model_name_or_path "$sft"
        run "ppo_${name}_s$s" ppo.py --seed "$s" --sft_model_path "$sft" --reward_model_path "$rm"
    }
    for s in $SEEDS; do
        for setting in $SETTINGS; do
            IFS=, read -r k c pairs <<< "$setting"
            launch setting "$s" "$k" "$c" "$pairs"
        done
    done
    finish
    python benchmark/report.py annotator "$OUT" | tee "$OUT/table.md"
}

# Does PPO itself work? PPO on the golden length reward 1 - |n/N - 1| for N = 10, 20, 30, 3 seeds, from $SFT.
golden_length() {
    OUT=${OUT:-runs/bench/golden_length} SFT=${SFT:-runs/sft} SEEDS=${SEEDS:-1 2 3} JOBS=${JOBS:-2}
    export OMP_NUM_THREADS=1
    for s in $SEEDS; do
        for n in 10 20 30; do
            launch run "length${n}_s$s" ppo.py --sft_model_path "$SFT" --reward length --total_episodes 1280 \
                --eval_every 5 --target_length "$n" --seed "$s"
        done
    done
    finish
    python benchmark/report.py table "$OUT" --initial length10 length20 length30 \
        --keys length length_error within_10pct gold well_formed wall_time | tee "$OUT/table.md"
}

# Reward over-optimization: PPO with no KL penalty and with a KL coefficient tuned by a short sweep, RCfD with no KL
# (the paper's setting) and with rcfd.py's default 0.2, 3 seeds each, from $SFT and $RM with one budget.
overoptimization() {
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    SFT=${SFT:-runs/sft} RM=${RM:-runs/reward_model} OUT=${OUT:-runs/bench/overopt} SEEDS=${SEEDS:-1 2 3}
    SWEEP=${SWEEP:-0.02 0.1 0.5} RCFD_SWEEP=${RCFD_SWEEP:-0.05 0.5} JOBS=${JOBS:-3}
    BUDGET=(--sft_model_path "$SFT" --reward_model_path "$RM" --total_episodes 1536 --batch_size 64 --eval_every 4
            --eval_rows 128 --learning_rate 3e-4)
    # 1. PPO's KL coefficient, tuned on seed 1 by the final gold reward (an oracle a real sweep does not have: the
    #    best case for the baseline); the chosen run is the tuned baseline's seed 1
    for kl in $SWEEP; do launch run "sweep/ppo_kl${kl}_s1" ppo.py --kl_coef "$kl" --seed 1 "${BUDGET[@]}"; done
    finish
    TUNED_KL=${TUNED_KL:-$(python benchmark/overoptimization.py pick "$OUT/sweep")}
    echo "tuned kl_coef: $TUNED_KL"
    [ -e "$OUT/ppo_kl${TUNED_KL}_s1" ] || cp -r "$OUT/sweep/ppo_kl${TUNED_KL}_s1" "$OUT/ppo_kl${TUNED_KL}_s1"
    # 2. the comparison
    compare() {
        local seed=$1
        run "ppo_nokl_s$seed" ppo.py --kl_coef 0 --seed "$seed" "${BUDGET[@]}"
        run "ppo_kl${TUNED_KL}_s$seed" ppo.py --kl_coef "$TUNED_KL" --seed "$seed" "${BUDGET[@]}"
        run "rcfd_s$seed" rcfd.py --kl_coef 0 --seed "$seed" "${BUDGET[@]}"  # the paper's setting (no KL)
        run "rcfd_kl0.2_s$seed" rcfd.py --seed "$seed" "${BUDGET[@]}"          # rcfd.py's default: --kl_coef 0.2
    }
    for seed in $SEEDS; do launch compare "$seed"; done
    finish
    # 3. RCfD's KL coefficient, swept on seed 1 as PPO's is; 0 and 0.2 are the comparison's seed-1 runs
    for kl in $RCFD_SWEEP; do
        launch run "rcfd_sweep/rcfd_kl${kl}_s1" rcfd.py --kl_coef "$kl" --seed 1 "${BUDGET[@]}"
    done
    finish
    [ -e "$OUT/rcfd_sweep/rcfd_kl0_s1" ] || cp -r "$OUT/rcfd_s1" "$OUT/rcfd_sweep/rcfd_kl0_s1"
    [ -e "$OUT/rcfd_sweep/rcfd_kl0.2_s1" ] || cp -r "$OUT/rcfd_kl0.2_s1" "$OUT/rcfd_sweep/rcfd_kl0.2_s1"
    # 4. every final policy's alignment with the same reward model, then the table
    python benchmark/overoptimization.py alignment "$OUT" --reward_model_path "$RM"
    python benchmark/overoptimization.py table "$OUT" | tee "$OUT/table.md"
}

# PPO-max against ppo.py with no KL penalty, 3 seeds; then PPO-max with --ptx_coef 0.5 and ppo.py with PPO-max's
# update budget ($OUT/stability_extra). From $SFT and $RM.
stability() {
    export OMP_NUM_THREADS=1
    SFT=${SFT:-runs/sft} RM=${RM:-runs/reward_model} OUT=${OUT:-runs/bench} JOBS=${JOBS:-2}
    SETTING=(--sft_model_path "$SFT" --reward_model_path "$RM" --kl_coef 0 --total_episodes 2560 --eval_rows 64
             --eval_every 10)
    for seed in 1 2 3; do
        launch run "stability/ppo_s$seed" ppo.py "${SETTING[@]}" --seed "$seed"
        launch run "stability/ppo_max_s$seed" ppo_max.py "${SETTING[@]}" --seed "$seed"
    done
    for seed in 1 2 3; do
        launch run "stability_extra/ppo_max_ptx0.5_s$seed" ppo_max.py "${SETTING[@]}" --seed "$seed" --ptx_coef 0.5
        launch run "stability_extra/ppo_1pass_s$seed" ppo.py "${SETTING[@]}" --seed "$seed" --num_ppo_epochs 1 \
            --num_mini_batches 4
    done
    finish
    python benchmark/report.py stability "$OUT/stability"
    python benchmark/report.py stability "$OUT/stability_extra"
}

# RRHF: the default offline sources, online sampling with and without a KL term, and both ranked by the gold reward.
rrhf() {
    OUT=${OUT:-runs/bench/rrhf} SFT=${SFT:-runs/sft} RM=${RM:-runs/reward_model} SEEDS=${SEEDS:-1 2 3} JOBS=${JOBS:-3}
    export OMP_NUM_THREADS=1
    seed_runs() {
        local s=$1 rrhf=(rrhf.py --sft_model_path "$SFT" --reward_model_path "$RM" --seed "$1")
        run "default_s$s" "${rrhf[@]}"
        run "online_s$s" "${rrhf[@]}" --sources online
        run "online_kl0.05_s$s" "${rrhf[@]}" --sources online --kl_coef 0.05
        run "gold_s$s" "${rrhf[@]}" --reward gold
        run "gold_online_s$s" "${rrhf[@]}" --reward gold --sources online
    }
    for s in $SEEDS; do launch seed_runs "$s"; done
    finish
    python benchmark/report.py table "$OUT" --initial default \
        --keys gold reward kl length well_formed wall_time peak_memory_mb | tee "$OUT/table.md"
}

# Length correlations ("A Long Way to Go"): three reward models from $SFT; PPO on the default one, with each RL-side
# intervention, on the two others, and length-only PPO; then every final policy's tables (analysis.py length_study).
length() {
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    SFT=${SFT:-runs/sft} OUT=${OUT:-runs/bench/length} SEEDS=${SEEDS:-1 2} JOBS=${JOBS:-2}
    TARGET=${TARGET:-17}     # N of the length penalty: about the SFT policy's mean length
    LONG=${LONG:-40}         # LPPO's target: a long one, more than twice the SFT length
    SAMPLES=${SAMPLES:-2}    # samples per held-out prompt in the final scoring
    BUDGET=(--sft_model_path "$SFT" --total_episodes 3200 --batch_size 64 --eval_every 10 --eval_rows 128)
    mkdir -p "$OUT"
    [ -d "$SFT" ] || { echo "$SFT not found: run \`python sft.py\` first or set SFT=..."; exit 2; }
    launch run rm_default reward_model.py --model_name_or_path "$SFT"
    launch run rm_balance reward_model.py --model_name_or_path "$SFT" --length_balance
    launch run rm_augment reward_model.py --model_name_or_path "$SFT" --random_augment 0.25
    finish
    RM=(--reward_model_path "$OUT/rm_default")
    for seed in $SEEDS; do
        S=(--seed "$seed")
        launch run "ppo_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}"
        launch run "ppo_lenpen_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}" --length_penalty 0.5 \
            --target_length "$TARGET"
        launch run "ppo_omitlong_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}" --omit_long
        launch run "ppo_kl0.12_s$seed" ppo.py "${BUDGET[@]}" "${RM[@]}" "${S[@]}" --kl_coef 0.12
        launch run "ppo_rmbalance_s$seed" ppo.py "${BUDGET[@]}" --reward_model_path "$OUT/rm_balance" "${S[@]}"
        launch run "ppo_rmaugment_s$seed" ppo.py "${BUDGET[@]}" --reward_model_path "$OUT/rm_augment" "${S[@]}"
        launch run "lppo${LONG}_s$seed" ppo.py "${BUDGET[@]}" "${S[@]}" --reward length --target_length "$LONG"
    done
    finish
    # every policy, and the SFT policy, sampled again and scored by every reward model; the tables
    python benchmark/analysis.py length_study "$OUT" "$SFT" "$SAMPLES" | tee "$OUT/table.md"
    echo "CPU time of the runs (this invocation):"; times
}

# ppo.py against TRL's PPOTrainer (speed.py), then ppo.py's peak memory with glibc returning freed memory at once and
# without ($OUT/memory); alone on the machine, with TRL's environment (RESULTS.md's speed section).
speed() {
    OUT=${OUT:-runs/bench/speed}
    mkdir -p "$OUT"
    python benchmark/speed.py --work_dir "$OUT"
    flags=(--sft_model_path "$OUT/models-toy-cpu/sft" --reward_model_path "$OUT/models-toy-cpu/reward_model"
           --total_episodes 640 --missing_eos_score -1 --eval_every 1000000 --save_every 1000000)
    run_once "$OUT/memory/default_s1" python ppo.py "${flags[@]}"
    MALLOC_TRIM_THRESHOLD_=0 run_once "$OUT/memory/malloc_trim_s1" python ppo.py "${flags[@]}"
    python benchmark/report.py table "$OUT/memory" --keys peak_memory_mb wall_time
}

if [ $# -gt 0 ]; then  # the named studies, one after the other, each in a subshell of its own
    for study in "$@"; do
        [[ " $ALL " == *" $study "* ]] || { echo "unknown study '$study': one of $ALL"; exit 2; }
        ( "$study" )
    done
    exit 0
fi

B=runs/bench
STUDIES=${STUDIES:-$ALL}
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
    case $study in  # each study in a process of its own
        annotator) OUT=$B/annotator SFTS=$B/pipeline bash benchmark/run_all.sh annotator ;;
        stability) OUT=$B bash benchmark/run_all.sh stability ;;
        overoptimization) OUT=$B/overopt bash benchmark/run_all.sh overoptimization ;;
        *) OUT=$B/$study bash benchmark/run_all.sh "$study" ;;
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
