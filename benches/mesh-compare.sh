#!/usr/bin/env bash
# seam as the `ours` topology of the shared sidecar load harness (../shared/bench), beside
# nginx, HAProxy and Envoy pairs with mTLS.
#
#   benches/mesh-compare.sh verify        start the pair, run the harness's checks, stop
#   benches/mesh-compare.sh compare       ROUNDS (default 3) interleaved rounds, all
#                                         topologies and cases; prints the ratio table
#   benches/mesh-compare.sh rss           each case once against a running pair, then
#                                         the peak RSS of both seams and their /stats
#   benches/mesh-compare.sh run CASE      one case (h2-1k h2-1m h1-1k h1-1m), one JSON line
#   benches/mesh-compare.sh env           print the exports, for calling the harness by hand
#
# Run the harness's setup.sh once first (tools, certificates, bodies). seam uses the
# harness's own certificates: a.crt carries spiffe://mesh.local/ns/bench/sa/a, which seam
# reads as the service "a.bench" (Kubernetes-style identity), b.crt is "b.bench".
#
# Like the other peers each seam runs one worker thread (runtime.worker_threads: 1, a
# current-thread runtime) with warnings-only logs, both pinned to CPU 0 by the harness.
# A listens on the harness's two client ports through listen.pinned (both sniff HTTP/1.1
# and h2c, so either works for either), routes everything to b.bench and seals it in a
# session over one HTTP/2 mTLS connection. B enables interop.plain_mtls only because the
# harness's `verify` sends a plain mTLS request with A's certificate; the measured traffic
# is all sealed, which `rss` shows in B's /stats.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
HARNESS=${HARNESS:-$ROOT/../shared/bench}
[ -f "$HARNESS/lib.sh" ] || { echo "no load harness at $HARNESS; set HARNESS=/path/to/bench" >&2; exit 1; }
# shellcheck source=/dev/null
source "$HARNESS/lib.sh"
[ -f "$CERT_DIR/ca.crt" ] && [ -f "$CERT_DIR/a.key" ] || die "no harness certificates in $CERT_DIR; run $HARNESS/setup.sh first"

TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
SEAM=$TARGET_DIR/release/seam
if [ -z "${SKIP_BUILD:-}" ]; then
  log "building seam (release)"
  cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
fi
[ -x "$SEAM" ] || die "no seam binary at $SEAM"

CONF_DIR=$STATE/seam
mkdir -p "$CONF_DIR"

cat >"$CONF_DIR/a.yaml" <<EOF
# written by benches/mesh-compare.sh: sidecar A, the caller's seam
service: a.bench
trust_domain: mesh.local
listen:
  outbound: 127.0.0.1:0
  inbound: 127.0.0.1:0
  admin: 127.0.0.1:$A_ADMIN_PORT
  pinned:
    "127.0.0.1:$A_H1_PORT": b.bench
    "127.0.0.1:$A_H2C_PORT": b.bench
upstream: http://127.0.0.1:$APP_H1_PORT
tls: { ca: $CERT_DIR/ca.crt, cert: $CERT_DIR/a.crt, key: $CERT_DIR/a.key }
peers:
  b.bench: [127.0.0.1:$B_MTLS_PORT]
runtime: { worker_threads: 1 }
EOF

cat >"$CONF_DIR/b.yaml" <<EOF
# written by benches/mesh-compare.sh: sidecar B, in front of the harness's app
service: b.bench
trust_domain: mesh.local
listen:
  outbound: 127.0.0.1:0
  inbound: 127.0.0.1:$B_MTLS_PORT
  admin: 127.0.0.1:$B_ADMIN_PORT
upstream: http://127.0.0.1:$APP_H1_PORT
tls: { ca: $CERT_DIR/ca.crt, cert: $CERT_DIR/b.crt, key: $CERT_DIR/b.key }
# The limiter stays in the path, with a quota the load never reaches.
rate_limit:
  default: { per_second: 1000000, burst: 100000 }
runtime: { worker_threads: 1 }
interop: { plain_mtls: true }
EOF

for side in a b; do
  "$SEAM" config check "$CONF_DIR/$side.yaml" >/dev/null || die "$CONF_DIR/$side.yaml is not valid"
done

# `env` keeps the exec chain: the harness records the PID of seam itself.
export MESH_A_CMD="env RUST_LOG=${SEAM_LOG:-warn} $SEAM run --log-format json --config $CONF_DIR/a.yaml"
export MESH_B_CMD="env RUST_LOG=${SEAM_LOG:-warn} $SEAM run --log-format json --config $CONF_DIR/b.yaml"

# Peak RSS (VmHWM) of a recorded sidecar, in KiB.
peak_rss_kib() {
  local pid
  pid=$(awk -v n="$1" '$1==n{print $2}' "$RUN_ROOT/ours/pids")
  awk '/^VmHWM:/{print $2}' "/proc/$pid/status"
}

case ${1:-compare} in
  verify)
    trap 'bash "$HARNESS/topo.sh" ours stop' EXIT
    bash "$HARNESS/topo.sh" ours start
    bash "$HARNESS/topo.sh" ours verify
    ;;
  compare)
    ROUNDS=${ROUNDS:-3} bash "$HARNESS/compare.sh"
    ;;
  run)
    bash "$HARNESS/run.sh" ours "${2:?usage: mesh-compare.sh run <case>}"
    ;;
  rss)
    trap 'bash "$HARNESS/topo.sh" ours stop' EXIT
    bash "$HARNESS/topo.sh" ours start
    for c in ${CASES:-$ALL_CASES}; do
      bash "$HARNESS/run.sh" ours "$c"
    done
    echo "peak RSS under load: A $(($(peak_rss_kib sidecar-a) / 1024)) MiB, B $(($(peak_rss_kib sidecar-b) / 1024)) MiB"
    echo "B /stats (sealed traffic, handshakes):"
    curl -s --noproxy '*' "http://127.0.0.1:$B_ADMIN_PORT/stats" \
      | python3 -c 'import json,sys; s=json.load(sys.stdin); print(json.dumps({k: s[k] for k in ("sessions","handshakes","requests","bytes") if k in s}, indent=1))'
    ;;
  env)
    echo "export MESH_A_CMD='$MESH_A_CMD'"
    echo "export MESH_B_CMD='$MESH_B_CMD'"
    ;;
  *)
    die "usage: mesh-compare.sh verify|compare|rss|run CASE|env"
    ;;
esac
