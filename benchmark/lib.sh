# What every benchmark script starts with (`source "$(dirname "$0")/lib.sh"`): strict mode, the repository's root as
# the working directory, and the helpers below.
set -euo pipefail
cd "$(dirname "$0")/.."

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
