#!/usr/bin/env bash
# Length correlations in RLHF on the toy world ("A Long Way to Go", Singhal et al. 2023; RESULTS.md, length.md): three
# reward models from $SFT (default, --length_balance, --random_augment 0.25); PPO with one budget and seeds on the
# default one, with each RL-side intervention, on the two others, and length-only PPO; then the tables of every final
# policy and the SFT policy sampled again (benchmark/analysis.py length_study): $OUT/table.md.
source "$(dirname "$0")/lib.sh"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SFT=${SFT:-runs/sft}
OUT=${OUT:-runs/bench/length}
SEEDS=${SEEDS:-1 2}
JOBS=${JOBS:-2}
TARGET=${TARGET:-17}     # N of the length penalty: about the SFT policy's mean length
LONG=${LONG:-40}         # LPPO's target: a long one, more than twice the SFT length
SAMPLES=${SAMPLES:-2}    # samples per held-out prompt in the final scoring
BUDGET=(--sft_model_path "$SFT" --total_episodes 3200 --batch_size 64 --eval_every 10 --eval_rows 128)

run() {  # run NAME SCRIPT ARGS...: one training run into $OUT/NAME
    local name=$1; shift
    run_once "$OUT/$name" python "$@"
}

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
