# shellcheck shell=bash
# Process and build helpers shared by the bench scripts (sourced, not run).
#
# target_dir REPO CARGO...: where cargo (the command CARGO...) builds REPO
# (CARGO_TARGET_DIR or a `build.target-dir` setting move it from REPO/target),
# so that a script runs the binary it has just built, never an old one.
target_dir() {
    local repo=$1
    shift
    (cd "$repo" && "$@" metadata --format-version 1 --no-deps) |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}

# The caller keeps
# the PIDs of the processes it started, and has not reaped yet, in the array PIDS.
# Processes are only ever signalled by PID, and only while they are still the
# caller's own children: a reaped PID may belong to anyone by then.

# proc_alive PID: still our child and not a zombie.
proc_alive() {
    local st
    st="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    st="${st##*) }"
    read -r -a st <<<"$st"
    [[ "${st[0]}" != Z && "${st[1]}" == "$$" ]]
}

# forget_pid PID: a reaped child; its (reusable) PID is never signalled again.
forget_pid() {
    local -a keep=()
    local p
    for p in "${PIDS[@]}"; do
        [[ "$p" == "$1" ]] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}

# stop_pid PID: SIGTERM, up to 5 s to end, then SIGKILL; reaps and forgets it.
stop_pid() {
    local pid=$1 i
    if proc_alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            proc_alive "$pid" || break
            sleep 0.1
        done
        if proc_alive "$pid"; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
    forget_pid "$pid"
}
