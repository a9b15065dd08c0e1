#!/usr/bin/env bash
# Short A/B runs on the load harness's pair: where a sidecar pair's CPU goes per request,
# side by side, for builds or settings too close for the harness's 10 s rounds to tell
# apart on a noisy machine. Alternate the variants in one sitting and compare medians.
#
#   benches/pair-cpu.sh CASE [N]          seam (target/release/seam) at CASE: N requests
#                                         (h2-*, h2load; default 3000), or N seconds
#                                         (h1-*, wrk like the harness; default 8)
#   TOPO=nginx benches/pair-cpu.sh CASE   a peer topology of the harness instead
#   SEAM_BIN=/path/to/seam ...            another seam binary (both sides)
#   SEAM_ENV="NAME=value ..." ...         environment for both seams
#   TAG=label ...                         the first word of the output line
#
# One line per run: requests per second; the pair's CPU µs per request, and each side's
# user + system share of it (/proc/<pid>/task/*/stat of the side and its children); the
# load generator's voluntary context switches per request (each a wake-up from the sending
# side, an IPI on this VM; fewer of them did not by itself mean less CPU, benches/RESULTS.md); the kernel's zero-window advertisements per request
# (nstat: a receive buffer that filled). CASE as in the harness: h2-1k h2-1m h1-1k h1-1m.
# A warm-up first (N/5 requests, or 2 s). The harness's CPU pinning applies (pair on CPU 0,
# h2load and the app on CPU 1).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
case_name=${1:?usage: benches/pair-cpu.sh CASE [N]}
topo=${TOPO:-ours}
HARNESS=${HARNESS:-$ROOT/../shared/bench}
eval "$(SKIP_BUILD=1 bash "$ROOT/benches/mesh-compare.sh" env)"
# shellcheck source=/dev/null
source "$HARNESS/lib.sh"
built=${CARGO_TARGET_DIR:-$ROOT/target}/release/seam
seam="${SEAM_ENV:+env $SEAM_ENV }${SEAM_BIN:-$built}"
export MESH_A_CMD=${MESH_A_CMD//$built/$seam}
export MESH_B_CMD=${MESH_B_CMD//$built/$seam}

case $case_name in
  h2-1k) url=http://127.0.0.1:19002/1k ;;
  h2-1m) url=http://127.0.0.1:19002/1m ;;
  h1-1k) url=http://127.0.0.1:19001/1k ;;
  h1-1m) url=http://127.0.0.1:19001/1m ;;
  *) echo "unknown case $case_name (h2-1k h2-1m h1-1k h1-1m)" >&2; exit 2 ;;
esac
case $case_name in
  h2-*) n=${2:-3000}; warm=(-n $((n / 5))); measure=(-n "$n") ;;
  h1-*) n=${2:-8}; warm=(-d 2s); measure=(-d "${n}s") ;;
esac
# The load generator as the harness runs it: `load warm|measure [PREFIX COMMAND...]`.
load() {
  local length
  if [ "$1" = warm ]; then length=("${warm[@]}"); else length=("${measure[@]}"); fi
  shift
  case $case_name in
    h2-*) taskset -c "$PIN_CLIENT" "$@" h2load -t1 -c"$H2_CLIENTS" -m"$H2_STREAMS" "${length[@]}" "$url" ;;
    h1-*) taskset -c "$PIN_CLIENT" "$@" wrk -t1 -c"$H1_CONNS" "${length[@]}" "$url" ;;
  esac
}

out=$(mktemp -d)
trap 'bash "$HARNESS/topo.sh" "$topo" stop >/dev/null 2>&1; rm -rf "$out"' EXIT
bash "$HARNESS/topo.sh" "$topo" start >/dev/null 2>&1 || { echo "$topo did not start" >&2; exit 1; }

# User and system clock ticks of one side and its children (nginx's workers).
ticks() {
  local pid
  for pid in $(awk -v side="$1" '$1 == side { print $2 }' "$RUN_ROOT/$topo/pids"); do
    for p in "$pid" $(pgrep -P "$pid"); do
      awk '{ u += $14; s += $15 } END { print u, s }' /proc/"$p"/task/*/stat
    done
  done | awk '{ u += $1; s += $2 } END { print u + 0, s + 0 }'
}

load warm >/dev/null 2>&1 || true
read -r au0 as0 < <(ticks sidecar-a)
read -r bu0 bs0 < <(ticks sidecar-b)
nstat -n >/dev/null
load measure /usr/bin/time -o "$out/time" -f "%w" >"$out/load" 2>&1
read -r au1 as1 < <(ticks sidecar-a)
read -r bu1 bs1 < <(ticks sidecar-b)
zero=$(nstat 2>/dev/null | awk '$1 == "TcpExtTCPToZeroWindowAdv" { print $2 }')

case $case_name in
  h2-*) done_n=$(grep -o "[0-9]* succeeded" "$out/load" | awk '{ print $1 }')
        rps=$(grep -o "finished in .*req/s" "$out/load" | awk '{ print $(NF-1) }') ;;
  h1-*) done_n=$(awk '/requests in/ { print $1 }' "$out/load")
        rps=$(awk '/^Requests\/sec/ { print $2 }' "$out/load") ;;
esac
[ "${done_n:-0}" -gt 0 ] || { cat "$out/load" >&2; exit 1; }
hz=$(getconf CLK_TCK)
awk -v tag="${TAG:-$topo}" -v c="$case_name" -v n="$done_n" -v rps="${rps:-0}" \
  -v hz="$hz" -v au=$((au1 - au0)) -v as=$((as1 - as0)) -v bu=$((bu1 - bu0)) \
  -v bs=$((bs1 - bs0)) -v wake="$(cat "$out/time")" -v zero="${zero:-0}" 'BEGIN {
    k = 1e6 / hz / n
    printf "%s %s requests=%d rps=%.0f pair_us=%.0f A=%.0f+%.0f B=%.0f+%.0f client_wakeups=%.1f zero_windows=%.1f\n",
      tag, c, n, rps, (au + as + bu + bs) * k, au * k, as * k, bu * k, bs * k, wake / n, zero / n
  }'
