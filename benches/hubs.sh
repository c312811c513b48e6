#!/usr/bin/env bash
# Compares WireGuard hubs in the same run: wgplane, wireguard-go with kernel
# policy routing (the old production setup) and boringtun-cli with the same
# kernel routing. Each run and hub gets a fresh lab of four network namespaces:
#
#  phone ns                 hub ns                     gw ns                          inet ns
#  wireguard-go 10.200.0.2 --veth-- HUB --veth-- wireguard-go 10.100.0.40, MASQUERADE --veth-- iperf3 -s
#  198.51.100.2          198.51.100.1  203.0.113.1   203.0.113.2    198.18.0.1              198.18.0.2
#
# The fourth "hub", relay, is the floor of any hub built on UDP sockets:
# `wgplane relay`, wgplane's socket IO passing datagrams on unchanged, with the
# phone and the gateway as each other's WireGuard peers through it. A hub's
# cost above the relay's is its cryptography and routing.
#
# inet has no route back to 10.200.0.0/24: answers only come back through the
# gateway's masquerade. Measured per run and hub: TCP (iperf3, hub CPU-seconds
# and whole-machine CPU-seconds per GiB received, Mbit/s) and 64-byte UDP (hub
# CPU-microseconds per packet received by the server).
#
# Usage: benches/hubs.sh [--runs N (3)] [--seconds S (10)] [--udp-rate PPS (50000)]
#                        [--hubs wgplane,wireguard-go,boringtun,relay] [--json FILE] [--profile]
#                        [--peers bookworm|trixie]
# --profile: one more wgplane run (and relay run, when it is among the hubs),
# not counted, under `perf record`: where the hub's CPU goes, by kernel and
# user-space stage; and for wgplane `perf stat`: syscalls and context switches
# per datagram.
# --peers: the phone's and the gateway's wireguard-go. bookworm (default): the
# installed Debian package, 0.0.20220316, one syscall per datagram. trixie:
# Debian trixie's 0.0.20231211, which sends UDP GSO trains and receives with
# UDP GRO, fetched with a private apt configuration and unpacked under
# target/hubs-tools (the system's packages stay as they are). The wireguard-go
# hub is always the installed package.
# Needs root. Setup may download packages (apt; `cargo install` from crates.io;
# with --peers trixie, Debian's archive); the measured traffic stays inside the
# namespaces this script creates.
# Env: BORINGTUN_VERSION (0.7.1) to install, HUBS_KEEP=1 keeps logs and iperf3 JSON.
set -euo pipefail
# sudo's secure_path aside, a user's PATH has no sbin: iptables and sysctl live there.
export PATH="/usr/local/sbin:/usr/sbin:/sbin:$PATH"

RUNS=3
SECONDS_PER_TEST=10
HUBS="wgplane,wireguard-go,boringtun,relay"
UDP_RATE=50000
JSON_OUT=""
PROFILE=""
PEERS="bookworm"
BORINGTUN_VERSION="${BORINGTUN_VERSION:-0.7.1}"

usage() {
    sed -n '/^# Usage:/,/^set -euo/{/^#/p}' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    echo "hubs.sh: $*" >&2
    exit 1
}

while [[ $# -gt 0 ]]; do
    case "$1" in
        --runs) RUNS="${2:?--runs needs a value}"; shift 2 ;;
        --seconds) SECONDS_PER_TEST="${2:?--seconds needs a value}"; shift 2 ;;
        --hubs) HUBS="${2:?--hubs needs a value}"; shift 2 ;;
        --udp-rate) UDP_RATE="${2:?--udp-rate needs a value}"; shift 2 ;;
        --json) JSON_OUT="${2:?--json needs a file}"; shift 2 ;;
        --profile) PROFILE=1; shift ;;
        --peers) PEERS="${2:?--peers needs a value}"; shift 2 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "--runs must be a positive integer"
[[ "$SECONDS_PER_TEST" =~ ^[1-9][0-9]*$ ]] || die "--seconds must be a positive integer"
[[ "$UDP_RATE" =~ ^[1-9][0-9]*$ ]] || die "--udp-rate must be a positive integer"
[[ "$PEERS" == bookworm || "$PEERS" == trixie ]] || die "--peers must be bookworm or trixie"
IFS=',' read -r -a HUB_LIST <<<"$HUBS"
[[ ${#HUB_LIST[@]} -gt 0 ]] || die "--hubs is empty"
for h in "${HUB_LIST[@]}"; do
    case "$h" in
        wgplane | wireguard-go | boringtun | relay) ;;
        *) die "unknown hub '$h' (wgplane, wireguard-go, boringtun, relay)" ;;
    esac
done
[[ $EUID -eq 0 ]] || die "must run as root (namespaces, TUN devices, iptables)"
[[ -e /dev/net/tun ]] || die "/dev/net/tun is missing"
if [[ -n "$JSON_OUT" ]]; then
    JSON_OUT="$(realpath -m -- "$JSON_OUT")"
    # Found out now, not after the whole bench (and no empty file left behind).
    probe="$JSON_OUT.probe.$$"
    { : >"$probe" && rm -f -- "$probe"; } 2>/dev/null || die "cannot write --json $JSON_OUT"
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS_ROOT="$REPO/target/hubs-tools"
BORINGTUN="$TOOLS_ROOT/bin/boringtun-cli"
TRIXIE_WG="$TOOLS_ROOT/trixie/usr/bin/wireguard-go"
PEER_WG="wireguard-go" # the phone's and the gateway's; see --peers
WGPLANE="" # set by ensure_binaries: where cargo built it
TAG="$$"
API_PORT=7443
GW_PORT=51821 # the gateway's WireGuard port
IPERF_PORT=5201
# Interface names carry our PID: the UAPI sockets in /var/run/wireguard are not
# per namespace. Names are at most 15 bytes.
PHONE_IF="wgp${TAG}"
HUB_IF="wgh${TAG}"
GW_IF="wgg${TAG}"
PHONE_IF="${PHONE_IF:0:15}"
HUB_IF="${HUB_IF:0:15}"
GW_IF="${GW_IF:0:15}"
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1

# The caller's WGPLANE_* settings (config file, webhooks, TUN, master key...)
# must not reach the appliance under test: a config or webhook could make it
# contact addresses outside this run. It runs on flags and defaults alone.
while IFS= read -r var; do
    if [[ "$var" == WGPLANE_* ]]; then unset "$var"; fi
done < <(compgen -e)

log() {
    echo "[hubs $(date +%H:%M:%S)] $*" >&2
}

# Who builds: the owner of the repository when a user ran `sudo hubs.sh` on
# their own checkout, so that what cargo and git write under it and in
# CARGO_HOME stays theirs; root otherwise (root's checkout, or no sudo).
BUILDER_UID=0
BUILDER_GID=0
if [[ -n "${SUDO_UID:-}" && "$SUDO_UID" != 0 && "$(stat -c %u "$REPO")" == "$SUDO_UID" ]]; then
    BUILDER_UID=$SUDO_UID
    BUILDER_GID=${SUDO_GID:-$SUDO_UID}
fi

# as_caller CMD...: CMD as the builder.
as_caller() {
    if [[ "$BUILDER_UID" != 0 ]]; then
        local home
        home="$(getent passwd "$BUILDER_UID" | cut -d: -f6)"
        setpriv --reuid="$BUILDER_UID" --regid="$BUILDER_GID" --init-groups -- \
            env HOME="${home:-$HOME}" "$@"
    else
        "$@"
    fi
}

# give_to_caller PATH: what root wrote under the builder's checkout becomes theirs.
give_to_caller() {
    if [[ "$BUILDER_UID" != 0 ]]; then
        chown -R "$BUILDER_UID:$BUILDER_GID" -- "$1"
    fi
}

# ---------------------------------------------------------------- cleanup ---

PIDS=()       # processes we started (all our direct children)
NAMESPACES=() # namespaces we created
WORK=""       # temporary directory
LAST_PID=""

# proc_alive, forget_pid, stop_pid (by PID, never by name).
# shellcheck source=benches/procs.sh
source "$REPO/benches/procs.sh"

# Stops every process we started and deletes every namespace we created.
teardown_lab() {
    local pid ns
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
    PIDS=()
    for ns in "${NAMESPACES[@]}"; do
        ip netns del "$ns" 2>/dev/null || true
    done
    NAMESPACES=()
    for ifn in "$PHONE_IF" "$HUB_IF" "$GW_IF"; do
        rm -f "/var/run/wireguard/$ifn.sock"
    done
}

cleanup() {
    local rc=$?
    # A second Ctrl-C must not cut the teardown short.
    trap '' INT TERM
    trap - EXIT
    teardown_lab
    # A failed run keeps the runs it finished: they are measurements too.
    if ((rc != 0)) && [[ -s "${RESULTS:-}" ]]; then
        local kept="$TOOLS_ROOT/hubs-partial-$TAG.jsonl"
        if mkdir -p -- "$TOOLS_ROOT" && cp -- "$RESULTS" "$kept"; then
            give_to_caller "$kept"
            log "the runs finished before the failure: $kept"
        else
            log "the runs finished before the failure could not be kept"
        fi
    fi
    if [[ -n "$WORK" && -d "$WORK" && -z "${HUBS_KEEP:-}" ]]; then
        rm -rf -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- install ---

ensure_packages() {
    local -A pkg_of=(
        [iperf3]=iperf3 [wireguard-go]=wireguard-go [wg]=wireguard-tools
        [ip]=iproute2 [ss]=iproute2 [iptables]=iptables [sysctl]=procps
        [curl]=curl [ping]=iputils-ping [python3]=python3 [timeout]=coreutils
    )
    [[ -z "$PROFILE" ]] || pkg_of[perf]=linux-perf
    local -a missing=()
    local cmd
    for cmd in "${!pkg_of[@]}"; do
        command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}")
    done
    if [[ ${#missing[@]} -gt 0 ]]; then
        mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
        log "installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        # --foreground: Ctrl-C reaches apt (timeout's own process group would
        # keep it out, and the script's trap waits for the step to end).
        timeout --foreground 600 apt-get update -qq || die "apt-get update failed"
        timeout --foreground 900 apt-get install -y -qq "${missing[@]}" >/dev/null ||
            die "apt-get install ${missing[*]} failed"
        for cmd in "${!pkg_of[@]}"; do
            command -v "$cmd" >/dev/null 2>&1 ||
                die "\`$cmd\` is still missing after installing ${pkg_of[$cmd]}"
        done
    fi
}

# Namespaces of earlier runs that were killed before their cleanup (SIGKILL, a
# lost terminal): their processes are stopped by PID and the namespaces
# deleted, once the run that made them (the PID in their name) is gone.
remove_stale_labs() {
    local ns owner pid
    while read -r ns _; do
        [[ "$ns" =~ ^hb-[a-z]+-([0-9]+)$ ]] || continue
        owner="${BASH_REMATCH[1]}"
        [[ "$owner" != "$TAG" ]] || continue
        if kill -0 "$owner" 2>/dev/null; then
            # Its run still goes, or its PID went to another process since:
            # either way not ours to judge.
            log "kept $ns: process $owner is alive"
            continue
        fi
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            kill -KILL "$pid" 2>/dev/null || true
        done
        if ip netns del "$ns" 2>/dev/null; then
            log "removed $ns, left by run $owner"
        else
            log "could not remove $ns, left by run $owner"
        fi
    done < <(ip netns list 2>/dev/null)
}

find_cargo() {
    if command -v cargo >/dev/null 2>&1; then
        command -v cargo
    elif [[ -x "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" ]]; then
        echo "${CARGO_HOME:-$HOME/.cargo}/bin/cargo"
    else
        die "cargo not found (needed to build wgplane and boringtun-cli)"
    fi
}

needs_boringtun() {
    local h
    for h in "${HUB_LIST[@]}"; do [[ "$h" == boringtun ]] && return 0; done
    return 1
}

ensure_binaries() {
    local cargo
    cargo="$(find_cargo)"
    # A target directory an older version of this script filled as root
    # would refuse the builder: handed back first.
    if [[ "$BUILDER_UID" != 0 && -d "$REPO/target" ]] &&
        [[ -n "$(find "$REPO/target" -maxdepth 3 ! -uid "$BUILDER_UID" -print -quit)" ]]; then
        log "handing $REPO/target back to uid $BUILDER_UID"
        give_to_caller "$REPO/target"
    fi
    as_caller mkdir -p "$TOOLS_ROOT"
    if needs_boringtun && [[ ! -x "$BORINGTUN" ]]; then
        log "cargo install boringtun-cli $BORINGTUN_VERSION into $TOOLS_ROOT (a few minutes)"
        as_caller timeout --foreground 1800 "$cargo" install boringtun-cli \
            --version "$BORINGTUN_VERSION" --locked --root "$TOOLS_ROOT" ||
            die "cargo install boringtun-cli failed"
    fi
    log "cargo build --release --bin wgplane"
    if ! (cd "$REPO" && as_caller timeout --foreground 1800 "$cargo" build --release --bin wgplane) \
        >"$WORK/build.log" 2>&1; then
        tail -n 40 "$WORK/build.log" >&2
        die "cargo build --release of wgplane failed"
    fi
    local target
    target="$(target_dir "$REPO" as_caller "$cargo")" ||
        die "cargo metadata failed: where cargo builds is unknown"
    WGPLANE="$target/release/wgplane"
    [[ -x "$WGPLANE" ]] || die "$WGPLANE was not built"
}

# The trixie peers: Debian trixie's wireguard-go, unpacked into TOOLS_ROOT with
# apt's own tools and a private configuration (its lists and cache in WORK).
ensure_trixie_peers() {
    if [[ ! -x "$TRIXIE_WG" ]]; then
        log "fetching wireguard-go from Debian trixie into $TOOLS_ROOT/trixie"
        local apt="$WORK/apt"
        mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$apt/deb"
        echo "deb http://deb.debian.org/debian trixie main" >"$apt/sources.list"
        local -a opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=/dev/null
            -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache"
            -o APT::Sandbox::User=root) # the private directories are root's
        timeout --foreground 600 apt-get "${opts[@]}" update -qq || die "apt-get update (trixie) failed"
        (cd "$apt/deb" && timeout --foreground 600 apt-get "${opts[@]}" download -qq wireguard-go) ||
            die "apt-get download wireguard-go (trixie) failed"
        # Unpacked beside its place and renamed into it (one file system): an
        # interrupted unpack leaves nothing that looks installed.
        as_caller mkdir -p "$TOOLS_ROOT"
        local unpacked="$TOOLS_ROOT/.trixie.$TAG"
        rm -rf -- "$unpacked"
        dpkg-deb -x "$apt"/deb/wireguard-go_*.deb "$unpacked" || die "dpkg-deb -x failed"
        dpkg-deb -f "$apt"/deb/wireguard-go_*.deb Version >"$unpacked/VERSION"
        give_to_caller "$unpacked"
        rm -rf -- "$TOOLS_ROOT/trixie"
        mv -T -- "$unpacked" "$TOOLS_ROOT/trixie"
    fi
    "$TRIXIE_WG" --version >/dev/null 2>&1 || die "$TRIXIE_WG does not run"
    PEER_WG="$TRIXIE_WG"
}

# ------------------------------------------------------------------- lab ---

ns_name() { echo "hb-$1-$TAG"; }

nsx() {
    local ns=$1
    shift
    ip netns exec "$ns" "$@"
}

new_ns() {
    local ns
    ns="$(ns_name "$1")"
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    NAMESPACES+=("$ns")
    nsx "$ns" ip link set lo up
}

# veth NS_A IF_A ADDR_A NS_B IF_B ADDR_B: created inside the namespaces, so the
# host namespace never sees the links.
veth() {
    ip -n "$1" link add "$2" type veth peer name "$5" netns "$4"
    ip -n "$1" address add "$3" dev "$2"
    ip -n "$1" link set "$2" up
    ip -n "$4" address add "$6" dev "$5"
    ip -n "$4" link set "$5" up
}

# start_bg NS LOG CMD...: starts CMD in NS in the background, PID in LAST_PID.
# `ip netns exec` and `env` exec, so the PID is the program's own.
start_bg() {
    local ns=$1 logf=$2
    shift 2
    ip netns exec "$ns" env WG_PROCESS_FOREGROUND=1 NO_COLOR=1 "$@" </dev/null >"$logf" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

# wait_until SECONDS CMD...: polls CMD every 0.2 s.
wait_until() {
    local secs=$1 end
    shift
    end=$((SECONDS + secs))
    while ((SECONDS < end)); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    "$@" >/dev/null 2>&1
}

keypair() { # keypair NAME -> $DIR/NAME.key, echoes the public key
    local key="$DIR/$1.key"
    (umask 077 && wg genkey >"$key")
    wg pubkey <"$key"
}

# start_wg_userspace NS IF LOG PROGRAM...: a wireguard-go or boringtun device,
# waits until `wg` can talk to it.
start_wg_userspace() {
    local ns=$1 ifn=$2 logf=$3
    shift 3
    rm -f "/var/run/wireguard/$ifn.sock"
    start_bg "$ns" "$logf" "$@"
    local pid=$LAST_PID
    if ! wait_until 15 timeout 5 ip netns exec "$ns" wg show "$ifn"; then
        tail -n 30 "$logf" >&2 || true
        die "$* did not come up in $ns within 15 s"
    fi
    proc_alive "$pid" || die "$* exited right after start: $(tail -n 20 "$logf")"
}

# api METHOD PATH [BODY]: one admin API call from inside the hub namespace.
# Prints the body; fails unless the status is 2xx.
api() {
    local method=$1 path=$2 body=${3:-} out code
    local -a args=(-sS --noproxy '*' --max-time 5 -X "$method" -H "@$DIR/auth-header" -w '\n%{http_code}')
    if [[ -n "$body" ]]; then
        args+=(-H 'Content-Type: application/json' --data-binary "$body")
    fi
    out="$(nsx "$HUB_NS" curl "${args[@]}" "http://127.0.0.1:$API_PORT$path")" ||
        die "curl $method $path failed"
    code="${out##*$'\n'}"
    out="${out%$'\n'*}"
    [[ "$code" == 2* ]] || die "API $method $path $body answered $code: $out"
    printf '%s\n' "$out"
}

json_field() { # json_field FIELD <<<JSON
    python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"
}

wgplane_healthy() {
    [[ -s "$STATE/api-token" ]] || return 1
    [[ "$(nsx "$HUB_NS" curl -s --noproxy '*' -o /dev/null -w '%{http_code}' --max-time 2 \
        "http://127.0.0.1:$API_PORT/healthz")" == 200 ]]
}

# Starts the hub in HUB_NS; sets HUB_PID, HUB_PUB, HUB_PORT.
start_hub_wgplane() {
    STATE="$DIR/state"
    mkdir -p "$STATE"
    HUB_LOG="$DIR/wgplane.log"
    start_bg "$HUB_NS" "$HUB_LOG" "$WGPLANE" run --state-dir "$STATE" \
        --api-listen "127.0.0.1:$API_PORT" --bind 0.0.0.0 --public-host 198.51.100.1
    HUB_PID=$LAST_PID
    if ! wait_until 20 wgplane_healthy; then
        hub_failure "wgplane did not write $STATE/api-token and answer /healthz within 20 s"
    fi
    (umask 077 && printf 'Authorization: Bearer %s\n' "$(tr -d '[:space:]' <"$STATE/api-token")" \
        >"$DIR/auth-header")

    local tenant
    tenant="$(api PUT /v1/tenants/kitonga '{}')"
    HUB_PUB="$(json_field server_public_key <<<"$tenant")"
    HUB_PORT="$(json_field listen_port <<<"$tenant")"
    api PUT /v1/tenants/kitonga/routers/mikrotik-1 \
        "{\"name\":\"gw\",\"public_key\":\"$GW_PUB\",\"vpn_ip\":\"10.100.0.40\"}" >/dev/null
    api PUT /v1/tenants/kitonga/egress \
        '{"pool":"10.200.0.0/24","gateways":["mikrotik-1"]}' >/dev/null
    api PUT /v1/tenants/kitonga/clients/phone-1 \
        "{\"name\":\"phone\",\"public_key\":\"$PHONE_PUB\",\"vpn_ip\":\"10.200.0.2\"}" >/dev/null
}

# The floor: wgplane's socket IO relaying the phone's and the gateway's
# datagrams unchanged (their WireGuard session runs end to end through it).
start_hub_relay() {
    HUB_PUB=""
    HUB_PORT=51820
    HUB_LOG="$DIR/relay.log"
    start_bg "$HUB_NS" "$HUB_LOG" "$WGPLANE" relay --listen "0.0.0.0:$HUB_PORT" --to "203.0.113.2:$GW_PORT"
    HUB_PID=$LAST_PID
    wait_until 10 bash -c "[[ -n \"\$(ip netns exec '$HUB_NS' ss -Hlun 'sport = :$HUB_PORT')\" ]]" ||
        hub_failure "wgplane relay did not listen on $HUB_PORT within 10 s"
}

# wireguard-go or boringtun as hub, routed by the kernel like the old setup.
start_hub_kernel_routed() {
    local which=$1
    HUB_PUB="$(keypair hub)"
    HUB_PORT=51820
    HUB_LOG="$DIR/$which.log"
    if [[ "$which" == wireguard-go ]]; then
        start_wg_userspace "$HUB_NS" "$HUB_IF" "$HUB_LOG" wireguard-go "$HUB_IF"
    else
        start_wg_userspace "$HUB_NS" "$HUB_IF" "$HUB_LOG" "$BORINGTUN" "$HUB_IF" \
            --foreground --disable-drop-privileges --log "$HUB_LOG.boringtun"
    fi
    HUB_PID=$LAST_PID
    nsx "$HUB_NS" wg set "$HUB_IF" private-key "$DIR/hub.key" listen-port "$HUB_PORT" \
        peer "$PHONE_PUB" allowed-ips 10.200.0.2/32 \
        peer "$GW_PUB" allowed-ips 0.0.0.0/0
    nsx "$HUB_NS" ip address add 10.100.0.1/16 dev "$HUB_IF"
    nsx "$HUB_NS" ip link set "$HUB_IF" mtu 1420 up
    nsx "$HUB_NS" sysctl -q -w net.ipv4.ip_forward=1
    nsx "$HUB_NS" ip rule add from 10.200.0.0/24 lookup 100
    nsx "$HUB_NS" ip route add default dev "$HUB_IF" table 100
    nsx "$HUB_NS" ip route add 10.200.0.0/24 dev "$HUB_IF"
}

hub_failure() {
    {
        echo "----- hub log ($HUB_LOG), last 40 lines -----"
        tail -n 40 "$HUB_LOG" 2>/dev/null || true
        if [[ -f "$HUB_LOG.boringtun" ]]; then
            echo "----- boringtun log file -----"
            tail -n 40 "$HUB_LOG.boringtun" || true
        fi
        echo "----- phone: wg show -----"
        nsx "$PHONE_NS" wg show "$PHONE_IF" 2>&1 || true
        echo "----- gateway: wg show -----"
        nsx "$GW_NS" wg show "$GW_IF" 2>&1 || true
        if [[ "$CUR_HUB" != wgplane && "$CUR_HUB" != relay ]]; then
            echo "----- hub: wg show -----"
            nsx "$HUB_NS" wg show "$HUB_IF" 2>&1 || true
        fi
    } >&2
    die "$CUR_HUB: $*"
}

# Builds the lab for hub $1 and waits until the phone reaches 198.18.0.2.
build_lab() {
    CUR_HUB=$1
    DIR="$WORK/$CUR_HUB-run$2"
    mkdir -p "$DIR"
    PHONE_NS="$(ns_name phone)"
    HUB_NS="$(ns_name hub)"
    GW_NS="$(ns_name gw)"
    INET_NS="$(ns_name inet)"
    HUB_LOG="$DIR/hub.log"
    local role
    for role in phone hub gw inet; do new_ns "$role"; done
    veth "$PHONE_NS" eth0 198.51.100.2/24 "$HUB_NS" to-phone 198.51.100.1/24
    veth "$GW_NS" eth0 203.0.113.2/24 "$HUB_NS" to-gw 203.0.113.1/24
    veth "$GW_NS" to-inet 198.18.0.1/24 "$INET_NS" eth0 198.18.0.2/24

    # The internet: an iperf3 server, no route back to the client pool.
    start_bg "$INET_NS" "$DIR/iperf3-server.log" iperf3 -s -B 198.18.0.2 -p "$IPERF_PORT" --forceflush
    wait_until 10 bash -c "[[ -n \"\$(ip netns exec '$INET_NS' ss -Hltn 'sport = :$IPERF_PORT')\" ]]" ||
        die "iperf3 server did not listen in $INET_NS: $(cat "$DIR/iperf3-server.log")"

    PHONE_PUB="$(keypair phone)"
    GW_PUB="$(keypair gw)"
    case "$CUR_HUB" in
        wgplane) start_hub_wgplane ;;
        relay) start_hub_relay ;;
        *) start_hub_kernel_routed "$CUR_HUB" ;;
    esac

    # The gateway: tunnel to the hub carrying its subnet and the pool, the pool
    # masqueraded towards the internet. Behind the relay its peer is the phone,
    # whose endpoint (the relay's address) it learns from the phone's handshake.
    start_wg_userspace "$GW_NS" "$GW_IF" "$DIR/gw-wireguard-go.log" "$PEER_WG" "$GW_IF"
    if [[ "$CUR_HUB" == relay ]]; then
        nsx "$GW_NS" wg set "$GW_IF" private-key "$DIR/gw.key" listen-port "$GW_PORT" \
            peer "$PHONE_PUB" allowed-ips 10.200.0.2/32
    else
        nsx "$GW_NS" wg set "$GW_IF" private-key "$DIR/gw.key" listen-port "$GW_PORT" \
            peer "$HUB_PUB" endpoint "203.0.113.1:$HUB_PORT" \
            allowed-ips 10.100.0.0/16,10.200.0.0/24 persistent-keepalive 25
    fi
    nsx "$GW_NS" ip address add 10.100.0.40/16 dev "$GW_IF"
    nsx "$GW_NS" ip link set "$GW_IF" mtu 1420 up
    nsx "$GW_NS" ip route add 10.200.0.0/24 dev "$GW_IF"
    nsx "$GW_NS" sysctl -q -w net.ipv4.ip_forward=1
    nsx "$GW_NS" iptables -t nat -A POSTROUTING -s 10.200.0.0/24 -o to-inet -j MASQUERADE

    # The phone: everything for 198.18.0.2 into its tunnel.
    start_wg_userspace "$PHONE_NS" "$PHONE_IF" "$DIR/phone-wireguard-go.log" "$PEER_WG" "$PHONE_IF"
    # Behind the relay the phone's peer is the gateway itself.
    local phone_peer=$HUB_PUB
    [[ "$CUR_HUB" != relay ]] || phone_peer=$GW_PUB
    nsx "$PHONE_NS" wg set "$PHONE_IF" private-key "$DIR/phone.key" \
        peer "$phone_peer" endpoint "198.51.100.1:$HUB_PORT" \
        allowed-ips 0.0.0.0/0 persistent-keepalive 25
    nsx "$PHONE_NS" ip address add 10.200.0.2/32 dev "$PHONE_IF"
    nsx "$PHONE_NS" ip link set "$PHONE_IF" mtu 1420 up
    nsx "$PHONE_NS" ip route add 198.18.0.2/32 dev "$PHONE_IF"

    local end=$((SECONDS + 30))
    until nsx "$PHONE_NS" ping -n -q -c 1 -W 1 198.18.0.2 >/dev/null 2>&1; do
        proc_alive "$HUB_PID" || hub_failure "the hub process exited"
        ((SECONDS < end)) || hub_failure "the phone never reached 198.18.0.2 through the hub within 30 s"
        sleep 0.2
    done
    log "$CUR_HUB run $2: tunnel up (hub pid $HUB_PID)"
}

# ------------------------------------------------------------ measuring ---

CLK_TCK="$(getconf CLK_TCK)"

proc_ticks() { # utime + stime of $1 (all threads), in clock ticks
    local st
    st="$(cat "/proc/$1/stat")" || die "hub process $1 is gone"
    st="${st##*) }"
    # shellcheck disable=SC2086
    set -- $st
    echo $((${12} + ${13}))
}

machine_ticks() { # all non-idle time: user+nice+system+irq+softirq+steal
    local _cpu user nice system _idle _iowait irq softirq steal _rest
    read -r _cpu user nice system _idle _iowait irq softirq steal _rest </proc/stat
    echo $((user + nice + system + irq + softirq + steal))
}

# measure KIND ARGS...: runs iperf3 from the phone, records hub and machine
# CPU ticks around it, appends one JSON line to $RESULTS.
measure() {
    local kind=$1 run=$2
    shift 2
    local out="$DIR/iperf3-$kind.json" h0 m0 h1 m1 f0 f1
    f0="$(hub_to_gw_packets)"
    h0="$(proc_ticks "$HUB_PID")"
    m0="$(machine_ticks)"
    # In the background so that a signal interrupts `wait` and cleans up at once.
    timeout $((SECONDS_PER_TEST + 30)) ip netns exec "$PHONE_NS" \
        iperf3 -c 198.18.0.2 -p "$IPERF_PORT" -t "$SECONDS_PER_TEST" -J "$@" >"$out" 2>&1 &
    local client=$!
    PIDS+=("$client")
    local rc=0
    wait "$client" || rc=$?
    forget_pid "$client"
    if ((rc != 0)); then
        tail -n 20 "$out" >&2
        hub_failure "iperf3 $kind failed or timed out"
    fi
    h1="$(proc_ticks "$HUB_PID")"
    m1="$(machine_ticks)"
    f1="$(hub_to_gw_packets)"
    python3 - "$kind" "$CUR_HUB" "$run" "$out" "$((h1 - h0))" "$((m1 - m0))" "$CLK_TCK" "$((f1 - f0))" "$PEERS" \
        >>"$RESULTS" <<'PY' || hub_failure "the iperf3 $kind result is unusable (why: above)"
import json, sys
kind, hub, run, path, hub_ticks, machine_ticks, tck, forwarded, peers = sys.argv[1:]
forwarded = int(forwarded)
d = json.load(open(path))
if "error" in d:
    sys.exit(f"iperf3 error: {d['error']}")
end = d["end"]
hub_s = int(hub_ticks) / int(tck)
# /proc counts CPU time in ticks: a short run's figure is coarse. Said, not hidden.
if int(hub_ticks) < 100:
    print(f"hubs.sh: {hub} run {run} {kind}: the hub's CPU time is {hub_ticks} ticks of "
          f"1/{tck} s, so its figure is only good to about {100 / max(int(hub_ticks), 1):.0f} %; "
          "run longer (--seconds) for a figure to compare", file=sys.stderr)
machine_s = int(machine_ticks) / int(tck)
r = {"hub": hub, "run": int(run), "kind": kind,
     "hub_cpu_s": hub_s, "machine_cpu_s": machine_s}
if kind == "tcp":
    s = end["sum_received"]
    if not s["bytes"]:
        sys.exit(f"{hub} run {run}: TCP: the server received nothing; this run has no figures")
    gib = s["bytes"] / 2**30
    r.update(bytes=s["bytes"], seconds=s["seconds"],
             mbit_s=s["bits_per_second"] / 1e6,
             hub_cpu_s_per_gib=hub_s / gib if gib else None,
             machine_cpu_s_per_gib=machine_s / gib if gib else None)
else:
    # The server counts packets up to the highest sequence number it saw
    # ("packets") and the gaps below it ("lost_packets"): received is their
    # difference. Old iperf3 without sum_received: the sender's sum, same keys.
    s = end.get("sum_received") or end["sum"]
    sent = end.get("sum_sent", end["sum"])["packets"]
    lost = s["lost_packets"]
    received = s["packets"] - lost
    secs = s["seconds"]
    # Nothing through the hub is a broken run, not a rate of 0 packets/s.
    if received <= 0 or not secs:
        sys.exit(f"{hub} run {run}: UDP: the server received no packet of {sent} sent; "
                 "this run has no figures")
    # Per packet the hub forwarded (its datagrams that reached the gateway),
    # not per packet the server got: what is lost after the hub (the gateway,
    # its masquerade, the server) is not the hub's to pay for. The hub's own
    # handshakes and keepalives in that count are a handful against ~10^5.
    # Trixie's gateway writes UDP trains to its TUN as one packet: there the
    # server's count stands in, losses after the hub included.
    if peers == "trixie":
        forwarded = received
    if forwarded <= 0:
        sys.exit(f"{hub} run {run}: UDP: the hub sent nothing to the gateway; this run has no figures")
    r.update(sent=sent, lost=lost, received=received, seconds=secs,
             hub_forwarded=forwarded, lost_after_hub=max(forwarded - received, 0),
             received_pps=received / secs if secs else None,
             hub_cpu_us_per_pkt=hub_s * 1e6 / forwarded,
             machine_cpu_us_per_pkt=machine_s * 1e6 / received if received else None)
print(json.dumps(r))
PY
}

# Packets the hub has forwarded to the gateway so far, as the gateway's
# WireGuard interface received them (decrypted and handed to its kernel, one
# count per packet with bookworm's wireguard-go). Not a veth counter (a GSO
# train crosses veth as one packet), nor the gateway's UDP counters (a peer
# with UDP GRO takes a train as one datagram). Packets the gateway's socket
# dropped before decryption are left out: a few hundred in 10^5, against the
# hub. With trixie's peers the server's count is used instead (see measure).
hub_to_gw_packets() {
    nsx "$GW_NS" cat "/sys/class/net/$GW_IF/statistics/rx_packets"
}

# The internet server must only ever have seen the gateway's address.
check_masquerade() {
    local peers
    peers="$(sed -n 's/.*Accepted connection from \([0-9.]*\),.*/\1/p' "$DIR/iperf3-server.log" | sort -u)"
    [[ "$peers" == 198.18.0.1 ]] ||
        hub_failure "the iperf3 server saw clients '${peers//$'\n'/ }', expected only the gateway 198.18.0.1"
}

# ---------------------------------------------------------------- report ---

report() {
    python3 - "$RESULTS" "$JSON_OUT" "$RUNS" "$SECONDS_PER_TEST" "$UDP_RATE" "$HUBS" "$VERSIONS" <<'PY'
import json, statistics, sys
path, json_out, runs, secs, rate, hubs, versions = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
hubs = hubs.split(",")
metrics = [
    ("tcp", "mbit_s", "TCP throughput, Mbit/s (higher is better)"),
    ("tcp", "hub_cpu_s_per_gib", "TCP: hub process CPU-seconds per GiB received (lower is better)"),
    ("tcp", "machine_cpu_s_per_gib", "TCP: whole-machine CPU-seconds per GiB received (lower is better)"),
    ("udp", "received_pps", f"UDP 64-byte at {rate} pps offered: packets/s received (higher is better)"),
    ("udp", "hub_cpu_us_per_pkt", "UDP 64-byte: hub process CPU-µs per packet it forwarded (lower is better)"),
    ("udp", "machine_cpu_us_per_pkt", "UDP 64-byte: whole-machine CPU-µs per received packet (lower is better)"),
]
def fmt(x):
    if x is None:
        return "n/a"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
summary = {}
print(f"\n## WireGuard hubs: {runs} run(s), {secs} s per test\n")
print("  \n".join(versions.split("; ")))
for kind, key, title in metrics:
    print(f"\n### {title}\n")
    stats = {}
    for hub in hubs:
        vals = [r[key] for r in rows if r["hub"] == hub and r["kind"] == kind and r.get(key) is not None]
        if vals:
            stats[hub] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals), "n": len(vals)}
    base = stats.get("wgplane", {}).get("median")
    # A hub's CPU above the relay's is the cost of its own work (the relay is
    # the floor: the same datagrams through wgplane's socket IO, no crypto).
    floor = stats.get("relay", {}).get("median") if key.startswith("hub_cpu") else None
    extra = " above the floor (relay, median) |" if floor is not None else ""
    print(f"| hub | runs | min | median | max | vs wgplane (median) |{extra}")
    print("|---|---:|---:|---:|---:|---|" + ("---:|" if extra else ""))
    for hub in hubs:
        s = stats.get(hub)
        if not s:
            print(f"| {hub} | 0 | n/a | n/a | n/a | |" + (" |" if extra else ""))
            continue
        if hub == "wgplane":
            s["ratio_to_wgplane"] = 1.0
            ratio = "1.0×"
        elif base:
            s["ratio_to_wgplane"] = s["median"] / base
            ratio = f"{hub}: {s['median'] / base:.2f}× wgplane"
        else:
            ratio = "n/a"
        above = ""
        if floor is not None:
            s["above_floor"] = s["median"] - floor
            above = f" {fmt(s['above_floor'])} |"
        print(f"| {hub} | {s['n']} | {fmt(s['min'])} | {fmt(s['median'])} | {fmt(s['max'])} | {ratio} |{above}")
    summary[f"{kind}.{key}"] = stats
if json_out:
    with open(json_out, "w") as f:
        json.dump({"runs": int(runs), "seconds": int(secs), "udp_rate_pps": int(rate),
                   "hubs": hubs, "versions": versions.split("; "),
                   "raw": rows, "summary": summary}, f, indent=2)
    print(f"\nRaw numbers and summaries: {json_out}")
PY
}

# ------------------------------------------------------------------ main ---

WORK="$(mktemp -d /tmp/wgplane-hubs.XXXXXX)"
[[ -z "${HUBS_KEEP:-}" ]] || log "HUBS_KEEP set: logs and iperf3 JSON stay in $WORK"
ensure_packages
remove_stale_labs
ensure_binaries
[[ "$PEERS" == bookworm ]] || ensure_trixie_peers
# wgplane's datagrams so far (received + sent), from its /metrics.
hub_datagrams() {
    nsx "$HUB_NS" curl -sS --noproxy '*' --max-time 5 -H "@$DIR/auth-header" "http://127.0.0.1:$API_PORT/metrics" |
        awk '/^wgplane_datagrams_total\{/ && /direction="(received|sent)"/ {s += $NF} END {printf "%d\n", s}'
}

# Counted next to the profile: the syscalls of the data path and context switches.
STAT_EVENTS="syscalls:sys_enter_recvmmsg,syscalls:sys_enter_sendmsg,syscalls:sys_enter_sendmmsg"
STAT_EVENTS+=",syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,context-switches"

# profile_hub HUB (wgplane or relay): a lab outside the measured runs, with
# `perf record` on the hub during each test, then `perf stat` (wgplane only: the
# per-datagram counts need its /metrics); prints where its CPU went.
profile_hub() {
    local hub=$1
    build_lab "$hub" profile
    local kind secs=$((SECONDS_PER_TEST > 4 ? SECONDS_PER_TEST - 2 : 2))
    for kind in tcp udp; do
        local args=()
        [[ "$kind" == tcp ]] || args=(-u -l 64 -b "$UDP_BPS")
        log "$hub profile: $kind under perf record for ${secs}s$([[ "$hub" != wgplane ]] || echo ", then perf stat for ${secs}s")"
        timeout $((2 * SECONDS_PER_TEST + 30)) ip netns exec "$PHONE_NS" \
            iperf3 -c 198.18.0.2 -p "$IPERF_PORT" -t $((2 * SECONDS_PER_TEST)) "${args[@]}" \
            >"$DIR/iperf3-profile-$kind.log" 2>&1 &
        local client=$!
        PIDS+=("$client")
        sleep 1
        perf record -q -F 2000 -g -p "$HUB_PID" -o "$DIR/perf-$kind.data" -- sleep "$secs" \
            >/dev/null 2>"$DIR/perf-$kind.err" ||
            hub_failure "perf record failed: $(tail -3 "$DIR/perf-$kind.err")"
        # Then the counts, on the same traffic (perf stat next to perf record
        # makes the latter fail now and then). Syscall counts need the
        # tracepoints; without them the table is left out.
        if [[ "$hub" == wgplane ]]; then
            local d0
            d0="$(hub_datagrams)"
            perf stat -x, -e "$STAT_EVENTS" -p "$HUB_PID" -o "$DIR/stat-$kind.txt" -- sleep "$secs" \
                >/dev/null 2>&1 || rm -f "$DIR/stat-$kind.txt"
            echo "$(($(hub_datagrams) - d0))" >"$DIR/datagrams-$kind.txt"
        fi
        wait "$client" || hub_failure "iperf3 $kind (profile) failed"
        forget_pid "$client"
        perf report -i "$DIR/perf-$kind.data" --children --sort symbol --stdio -g none \
            2>/dev/null >"$DIR/perf-$kind.txt" || hub_failure "perf report failed"
    done
    teardown_lab
    python3 - "$DIR/perf-tcp.txt" "$DIR/perf-udp.txt" "$DIR" "$hub" <<'PY'
import os, re, sys
# Lines: "  children%  self%  [k|.] symbol"
def load(path):
    rows = []
    for line in open(path):
        m = re.match(r"\s*([\d.]+)%\s+([\d.]+)%\s+\[.\]\s+(\S+)", line)
        if m:
            rows.append((float(m.group(1)), float(m.group(2)), m.group(3)))
    return rows
def children(rows, name):
    return max((c for c, _, s in rows if s == name), default=0.0)
# glibc's names for the send calls: GSO runs and single datagrams may go by
# either (a build may send only with sendmmsg); neither calls the other.
SENDS = ("__libc_sendmsg", "__sendmmsg", "sendmmsg")
def sends(rows):
    return sum(children(rows, name) for name in SENDS)
def self_sum(rows, pred):
    return sum(x for _, x, s in rows if pred(s))
stages = [
    ("ChaCha20-Poly1305 (self)", lambda r: self_sum(r, lambda s: "chacha20_poly1305" in s)),
    ("sendmsg and sendmmsg, all of them", sends),
    ("  of which softirq on our sends (on veth: the receiver's stack)", lambda r: children(r, "__local_bh_enable_ip")),
    ("recvmmsg", lambda r: children(r, "__recvmmsg")),
    ("epoll_wait (sleeping and waking)", lambda r: children(r, "epoll_wait")),
    ("context switches (self)", lambda r: self_sum(r, lambda s: s.startswith("finish_task_switch"))),
    ("own code, wgplane::* (self)", lambda r: self_sum(r, lambda s: s.startswith("wgplane::"))),
]
tcp, udp = load(sys.argv[1]), load(sys.argv[2])
hub = sys.argv[4]
print(f"\n### Where {hub}'s CPU goes as the hub (perf, share of samples; nested rows overlap)\n")
print("| stage | TCP | UDP 64 B |")
print("|---|---:|---:|")
for name, f in stages:
    print(f"| {name} | {f(tcp):.1f} % | {f(udp):.1f} % |")

def counts(kind):
    path = os.path.join(sys.argv[3], f"stat-{kind}.txt")
    if not os.path.exists(path):
        return None
    out = {}
    for line in open(path):
        f = line.strip().split(",")
        if len(f) > 2 and not line.startswith("#") and f[0].isdigit():
            out[f[2].removeprefix("syscalls:sys_enter_")] = int(f[0])
    datagrams = int(open(os.path.join(sys.argv[3], f"datagrams-{kind}.txt")).read())
    return out, datagrams
tcp_c, udp_c = counts("tcp"), counts("udp")
if tcp_c and udp_c and tcp_c[1] > 0 and udp_c[1] > 0:
    print("\n### Per datagram the hub received or sent (perf stat, right after the profile)\n")
    print(f"| event | TCP ({tcp_c[1]} datagrams) | UDP 64 B ({udp_c[1]} datagrams) |")
    print("|---|---:|---:|")
    for event in ("recvmmsg", "sendmsg", "sendmmsg", "epoll_wait", "futex", "context-switches"):
        print(f"| {event} | {tcp_c[0].get(event, 0) / tcp_c[1]:.3f} | {udp_c[0].get(event, 0) / udp_c[1]:.3f} |")
elif hub == "wgplane":
    print("\n(no syscall counts: perf stat could not use the syscall tracepoints)")
PY
}

RESULTS="$WORK/results.jsonl"
: >"$RESULTS"
VERSIONS="wgplane $(cd "$REPO" && as_caller git describe --always --dirty 2>/dev/null || echo '?')"
VERSIONS+="; wireguard-go $(dpkg-query -W -f '${Version}' wireguard-go 2>/dev/null || echo '?')"
if needs_boringtun; then
    VERSIONS+="; $("$BORINGTUN" --version 2>/dev/null || echo 'boringtun ?')"
fi
if [[ "$PEERS" == trixie ]]; then
    VERSIONS+="; peers: wireguard-go $(cat "$TOOLS_ROOT/trixie/VERSION" 2>/dev/null || echo '?') (Debian trixie)"
else
    VERSIONS+="; peers: the hub's wireguard-go package"
fi
VERSIONS+="; iperf3 $(iperf3 --version | awk 'NR==1 {print $2}'); $(nproc) CPUs"
UDP_BPS=$((UDP_RATE * 64 * 8))

for ((run = 1; run <= RUNS; run++)); do
    for hub in "${HUB_LIST[@]}"; do
        build_lab "$hub" "$run"
        log "$hub run $run: TCP ${SECONDS_PER_TEST}s"
        measure tcp "$run"
        check_masquerade
        log "$hub run $run: UDP 64-byte at $UDP_RATE pps for ${SECONDS_PER_TEST}s"
        measure udp "$run" -u -l 64 -b "$UDP_BPS"
        teardown_lab
    done
done

report
if [[ -n "$PROFILE" ]]; then
    profile_hub wgplane
    for hub in "${HUB_LIST[@]}"; do
        [[ "$hub" != relay ]] || profile_hub relay
    done
fi
