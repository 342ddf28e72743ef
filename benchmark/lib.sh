# The helpers every study script shares: `source benchmark/lib.sh`.
#
#     run_once runs/bench/x/ppo_s1 python ppo.py --seed 1    # one run, skipped once finished
#     launch run_once ...                                     # in the background, at most $JOBS at once
#     finish                                                  # wait for them all; fails if one failed

# run_once DIR COMMAND...: `COMMAND --output_dir DIR --overwrite`, its output in DIR.log, and its wall and
# CPU time appended to time.log beside DIR (where GNU time is installed). A run whose DIR/summary.json
# exists is skipped; an unfinished one starts again from the beginning (--overwrite).
run_once() {
    local dir=$1; shift
    [ -f "$dir/summary.json" ] && return 0
    mkdir -p "$(dirname "$dir")"
    echo "$(date +%T) start $dir"
    local timer=()
    [ -x /usr/bin/time ] && timer=(/usr/bin/time -f "$(basename "$dir"): %e s wall, %U s user, %S s sys" \
        -a -o "$(dirname "$dir")/time.log")
    "${timer[@]}" "$@" --output_dir "$dir" --overwrite > "$dir.log" 2>&1 || { echo "$dir failed: see $dir.log"; return 1; }
    echo "$(date +%T) done $dir"
}

LAUNCHED=()
# launch COMMAND...: COMMAND in the background, once fewer than $JOBS (default 2) launched ones still run
launch() {
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do sleep 2; done
    "$@" & LAUNCHED+=($!)
}

# finish: wait for every launched command, all of them, then fail if one failed
finish() {
    local failed=0 pid
    for pid in "${LAUNCHED[@]}"; do wait "$pid" || failed=1; done
    LAUNCHED=()
    return $failed
}
