#!/usr/bin/env bash
# A handshake storm next to an established flow, with the appliance on one core.
#
# For each storm rate: starts wgplane pinned to one CPU, measures a phone ->
# gateway flow alone, then a storm of handshake initiations over 10 tunnels x 20
# routers (load generators pinned to another CPU), plus 20 routers that retry
# with their cookie as real WireGuard peers do, then a storm on the flow's own
# tunnel from 200 strangers (who know its public key, as every phone does) with
# the same 20 patient routers, then the storm on 10 other tunnels again with 200
# more routers that echo every cookie at once and handshake again as soon as
# one is answered, each from its own loopback address (address-proven load: the
# most Diffie-Hellman work senders can cause). Each storm runs twice: alone, for the storm's
# figures (answers, the appliance's CPU per initiation, the patient routers), and
# with the flow inside it, for the flow's loss and latency under the storm only
# (the appliance's CPU in that pass includes forwarding the flow, so none of it
# is reported).
#
# Usage: benches/storm.sh [--rates 20000,60000] [--seconds 15] [--flow-rate 20000]
#                         [--flow-seconds 8] [--json FILE]
# Loopback only; no privileges needed. Needs 2 CPUs, cargo, curl, python3,
# taskset and timeout.
set -euo pipefail

RATES="20000,60000"
STORM_SECONDS=15
FLOW_RATE=20000
FLOW_SECONDS=8
JSON_OUT=""

usage() {
    sed -n '/^# Usage:/,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "storm.sh: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --rates) RATES="${2:?--rates needs a value}"; shift 2 ;;
        --seconds) STORM_SECONDS="${2:?--seconds needs a value}"; shift 2 ;;
        --flow-rate) FLOW_RATE="${2:?--flow-rate needs a value}"; shift 2 ;;
        --flow-seconds) FLOW_SECONDS="${2:?--flow-seconds needs a value}"; shift 2 ;;
        --json) JSON_OUT="${2:?--json needs a file}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
[[ "$RATES" =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] || die "--rates must be positive integers, comma-separated"
[[ "$STORM_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "--seconds must be a positive integer"
[[ "$FLOW_RATE" =~ ^[1-9][0-9]*$ ]] || die "--flow-rate must be a positive integer"
[[ "$FLOW_SECONDS" =~ ^[1-9][0-9]*$ ]] || die "--flow-seconds must be a positive integer"
((STORM_SECONDS >= FLOW_SECONDS + 4)) || die "--seconds must be at least $((FLOW_SECONDS + 4)): the flow runs inside the storm"
for tool in cargo chrt curl python3 taskset timeout; do
    command -v "$tool" >/dev/null 2>&1 ||
        die "needs \`$tool\` (cargo: Rust's build tool, e.g. from rustup; chrt, taskset: util-linux; timeout: coreutils)"
done
# The CPUs this process may use (a cpuset may start anywhere, not at 0).
mapfile -t ALLOWED < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)), sep="\n")')
((${#ALLOWED[@]} >= 2)) || die "needs 2 CPUs (appliance on one, load generator on another)"
APP_CPU="${ALLOWED[-1]}"
GEN_CPU="${ALLOWED[0]}"
if [[ -n "$JSON_OUT" ]]; then
    JSON_OUT="$(realpath -m -- "$JSON_OUT")"
fi

# The caller's WGPLANE_* settings (config file, webhooks, TUN, master key...)
# must not reach the appliance under test: a config or webhook could make it
# contact addresses outside this run. It runs on flags and defaults alone.
while IFS= read -r var; do
    if [[ "$var" == WGPLANE_* ]]; then unset "$var"; fi
done < <(compgen -e)

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# A failing run's error message, not a backtrace, in the logs quoted on failure.
export RUST_BACKTRACE=0 RUST_LIB_BACKTRACE=0
(cd "$REPO" && cargo build --release --quiet) || die "cargo build --release failed"

WORK="$(mktemp -d /tmp/wgplane-storm.XXXXXX)"
PIDS=() # processes we started and have not reaped (all our direct children)

# proc_alive, forget_pid, stop_pid (by PID, never by name).
# shellcheck source=benches/procs.sh
source "$REPO/benches/procs.sh"
# The binary just built, wherever cargo builds.
WGPLANE="$(target_dir "$REPO" cargo)/release/wgplane" || die "cargo metadata failed"
[[ -x "$WGPLANE" ]] || die "$WGPLANE was not built"

# wait_pid PID: waits for our child PID, forgets it, returns its status.
wait_pid() {
    local rc=0
    wait "$1" || rc=$?
    forget_pid "$1"
    return "$rc"
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { # a free port of protocol $1 (tcp/udp) on loopback
    python3 -c "import socket,sys; s=socket.socket(socket.AF_INET, socket.SOCK_STREAM if sys.argv[1]=='tcp' else socket.SOCK_DGRAM); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])" "$1"
}

# The first of 64 consecutive free UDP ports on loopback for the appliance's
# tunnels, below the kernel's ephemeral range: the load generators bind hundreds
# of sockets to port 0, and one of them must not take a port before the
# appliance's next tenant does.
free_tunnel_ports() {
    python3 -c '
import socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
def free(p):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", p))
        return True
    except OSError:
        return False
    finally:
        s.close()
base = 20000
while base + 64 <= low:
    taken = next((p for p in range(base, base + 64) if not free(p)), None)
    if taken is None:
        print(base)
        raise SystemExit(0)
    base = taken + 1
raise SystemExit("no 64 free UDP ports below %d" % low)
'
}

# start_appliance DIR: wgplane on APP_CPU with its state in DIR; sets APP_PID, API.
start_appliance() {
    local dir=$1 port
    port="$(free_port tcp)"
    API="http://127.0.0.1:$port"
    mkdir -p "$dir"
    taskset -c "$APP_CPU" "$WGPLANE" run --state-dir "$dir/state" --bind 127.0.0.1 \
        --api-listen "127.0.0.1:$port" --first-port "$(free_tunnel_ports)" \
        >"$dir/wgplane.log" 2>&1 &
    APP_PID=$!
    PIDS+=("$APP_PID")
    local end=$((SECONDS + 20))
    until [[ -s "$dir/state/api-token" ]] && curl -fsS --noproxy '*' --max-time 2 "$API/healthz" >/dev/null 2>&1; do
        proc_alive "$APP_PID" || die "wgplane exited: $(tail -5 "$dir/wgplane.log")"
        ((SECONDS < end)) || die "wgplane did not come up within 20 s"
        sleep 0.2
    done
}

# The flow's generator runs on the load generator's CPU at normal priority, the
# storm's under SCHED_IDLE, on what the flow's generator leaves: the flow's
# latency then shows the appliance, not the storm generator taking the flow
# generator's CPU. (At nice 10 the echoing routers, when they still built a new
# initiation for every try, raised the flow's p99 from about 0.6 to 2 ms on their
# own; they now send initiations prepared before the window.)
# Every `wgplane bench` runs under timeout(1), a hang guard well beyond its
# set-up (handshakes, preparing initiations), its run and its drain.
flow() { # flow DIR NAME [ARGS...]: the flow's load generator against the appliance, JSON in DIR/NAME.json
    local dir=$1 name=$2
    shift 2
    timeout --kill-after=10 $((FLOW_SECONDS + 120)) taskset -c "$GEN_CPU" "$WGPLANE" bench --api "$API" --token-file "$dir/state/api-token" --pid "$APP_PID" --json \
        --size 1420 --rate "$FLOW_RATE" --seconds "$FLOW_SECONDS" "$@" \
        >"$dir/$name.json" 2>"$dir/$name.log" ||
        die "the flow ($name) failed or timed out: $(tail -20 "$dir/$name.log")"
}

# storm DIR NAME RATE ARGS...: starts a storm of RATE initiations/s (SCHED_IDLE,
# generator CPU) and returns once its measured window is open; sets STORM_PID.
storm() {
    local dir=$1 name=$2 storm_rate=$3
    shift 3
    timeout --kill-after=10 $((STORM_SECONDS + 600)) taskset -c "$GEN_CPU" chrt --idle 0 "$WGPLANE" bench --api "$API" --token-file "$dir/state/api-token" \
        --pid "$APP_PID" --json --mode handshakes --rate "$storm_rate" --seconds "$STORM_SECONDS" \
        --patient 20 "$@" >"$dir/$name.json" 2>"$dir/$name.log" &
    STORM_PID=$!
    PIDS+=("$STORM_PID")
    until grep -q "measured window opens" "$dir/$name.log"; do
        proc_alive "$STORM_PID" || die "the storm ended early: $(tail -5 "$dir/$name.log")"
        sleep 0.2
    done
    sleep 1
}

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
IFS=',' read -r -a RATE_LIST <<<"$RATES"
for rate in "${RATE_LIST[@]}"; do
    dir="$WORK/rate-$rate"
    start_appliance "$dir"
    echo "storm.sh: $rate initiations/s: flow alone" >&2
    flow "$dir" alone

    # The storm's figures come from a pass without the flow; the flow's figures
    # under the storm from a second pass, whose storm CPU is not reported.
    echo "storm.sh: $rate initiations/s: storm on other tunnels, alone" >&2
    storm "$dir" storm "$rate" --tunnels 10 --peers 20
    wait_pid "$STORM_PID" || die "the storm failed or timed out: $(tail -5 "$dir/storm.log")"
    echo "storm.sh: $rate initiations/s: preparing the storm on other tunnels" >&2
    storm "$dir" storm-flow "$rate" --tunnels 10 --peers 20
    echo "storm.sh: $rate initiations/s: flow inside the storm" >&2
    flow "$dir" under
    wait_pid "$STORM_PID" || die "the storm failed or timed out: $(tail -5 "$dir/storm-flow.log")"

    # Every router its own address: 200 storm, 20 patient, 200 echoing.
    echo "storm.sh: $rate initiations/s: address-proven storm on other tunnels, alone" >&2
    storm "$dir" storm-proven "$rate" --tunnels 10 --peers 20 --echoing 200 --sources 420
    wait_pid "$STORM_PID" || die "the storm failed or timed out: $(tail -5 "$dir/storm-proven.log")"
    echo "storm.sh: $rate initiations/s: preparing the address-proven storm" >&2
    storm "$dir" storm-proven-flow "$rate" --tunnels 10 --peers 20 --echoing 200 --sources 420
    echo "storm.sh: $rate initiations/s: flow inside the address-proven storm" >&2
    flow "$dir" under-proven
    wait_pid "$STORM_PID" || die "the storm failed or timed out: $(tail -5 "$dir/storm-proven-flow.log")"

    echo "storm.sh: $rate initiations/s: storm on the flow's own tunnel, alone" >&2
    storm "$dir" storm-own "$rate" --tenant ktn --peers 200
    wait_pid "$STORM_PID" || die "the storm failed or timed out: $(tail -5 "$dir/storm-own.log")"
    echo "storm.sh: $rate initiations/s: preparing the storm on the flow's own tunnel" >&2
    storm "$dir" storm-own-flow "$rate" --tenant ktn --peers 200
    echo "storm.sh: $rate initiations/s: flow inside the storm on its own tunnel" >&2
    flow "$dir" under-own --tenant ktn
    wait_pid "$STORM_PID" || die "the storm failed or timed out: $(tail -5 "$dir/storm-own-flow.log")"
    stop_pid "$APP_PID"
    python3 - "$rate" "$dir" >>"$RESULTS" <<'PY'
import json, sys
rate, d = int(sys.argv[1]), sys.argv[2]
load = lambda n: json.load(open(f"{d}/{n}.json"))
flow = lambda f: {"loss_percent": f["loss_percent"], "forwarded": f["forwarded_packets"],
                  "sent": f["sent_packets"], **{k: f["latency"][k] for k in ("p50_us", "p99_us", "p999_us", "max_us")}}
# A flow measured "under" a storm must have run inside the storm's sending: a
# flow whose set-up took longer, or a storm whose prepared initiations ran out
# early, would report the flow alone under the storm's name.
for f, s in (("under", "storm-flow"), ("under-proven", "storm-proven-flow"), ("under-own", "storm-own-flow")):
    fw, sw = load(f), load(s)
    if not (sw["window_start_unix_ms"] <= fw["window_start_unix_ms"] and fw["window_end_unix_ms"] <= sw["window_end_unix_ms"]):
        sys.exit(f"storm.sh: the flow {f} ran {fw['window_start_unix_ms']}..{fw['window_end_unix_ms']} ms, "
                 f"outside the storm's sending {sw['window_start_unix_ms']}..{sw['window_end_unix_ms']} ms: raise --seconds")
# A storm that carried the flow: its answers, not its CPU (which includes the flow's).
def without_cpu(s):
    return {k: v for k, v in s.items() if not k.startswith("appliance_cpu") and k != "appliance_cores" and not k.startswith("window_")}
print(json.dumps({"storm_rate": rate, "storm": load("storm"), "storm_own_tunnel": load("storm-own"),
                  "storm_proven": load("storm-proven"),
                  "storm_with_flow": without_cpu(load("storm-flow")),
                  "storm_own_tunnel_with_flow": without_cpu(load("storm-own-flow")),
                  "storm_proven_with_flow": without_cpu(load("storm-proven-flow")),
                  "flow_alone": flow(load("alone")), "flow_under_storm": flow(load("under")),
                  "flow_under_storm_on_own_tunnel": flow(load("under-own")),
                  "flow_under_proven_storm": flow(load("under-proven"))}))
PY
done

python3 - "$RESULTS" "$JSON_OUT" "$FLOW_RATE" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"\nAppliance on one CPU; flow: 1420-byte packets at {sys.argv[3]}/s.")
print("Storm table: the storm alone (no flow), appliance CPU included.\n")
print("| storm on | storm offered/s | answered/s | handshakes | cookie replies | unanswered | appliance cores | CPU-µs per initiation | address-proven handshakes/s | patient routers served | their time to handshake (p50 / max) |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
storms = (("10 other tunnels", "storm"), ("10 other tunnels, 200 echoing cookies", "storm_proven"),
          ("the flow's tunnel", "storm_own_tunnel"))
for r, target, s in [(r, t, r[k]) for r in rows for t, k in storms]:
    e = s["echoing"]
    proven = f"{e['handshakes_per_s']:.0f}" if e["routers"] else "-"
    print(f"| {target} | {s['offered_per_s']:.0f} | {s['answered_per_s']:.0f} | {s['responses']} | {s['cookie_replies']} "
          f"| {s['sent_initiations'] - s['responses'] - s['cookie_replies']} | {s['appliance_cores']:.2f} "
          f"| {s['appliance_cpu_us_per_initiation']:.1f} | {proven} "
          f"| {s['patient']['completed']} of {s['patient']['routers']} "
          f"| {s['patient']['seconds_p50'] or float('nan'):.2f} s / {s['patient']['seconds_max'] or float('nan'):.2f} s |")
print("\nFlow table: the flow alone, and inside a second pass of each storm.\n")
print("| storm offered/s | flow | loss % | forwarded/sent | p50 µs | p99 µs | p99.9 µs | max µs |")
print("|---:|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    for name, f in (("alone", r["flow_alone"]), ("storm on 10 other tunnels", r["flow_under_storm"]),
                    ("storm on 10 other tunnels, 200 echoing cookies", r["flow_under_proven_storm"]),
                    ("storm on its own tunnel", r["flow_under_storm_on_own_tunnel"])):
        print(f"| {r['storm_rate']} | {name} | {f['loss_percent']:.2f} | {f['forwarded']}/{f['sent']} "
              f"| {f['p50_us']} | {f['p99_us']} | {f['p999_us']} | {f['max_us']} |")
if sys.argv[2]:
    json.dump(rows, open(sys.argv[2], "w"), indent=2)
    print(f"\nJSON: {sys.argv[2]}")
PY
