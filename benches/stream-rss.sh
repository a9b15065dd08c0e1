#!/usr/bin/env bash
# Streams SIZE_MIB (default 1024) up and down through two real seams and reports each
# seam's peak RSS (VmHWM), before and after, to show bodies are never buffered whole.
#   benches/stream-rss.sh            # needs target/release/seam (cargo build --release)
# Loopback only; everything it starts is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SEAM=${SEAM:-target/release/seam}
SIZE_MIB=${SIZE_MIB:-1024}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
APP=$(free_port); OB=$(free_port); OI=$(free_port); OA=$(free_port); BB=$(free_port); BI=$(free_port); BA=$(free_port)

# The app: GET /download streams SIZE_MIB of zeros, POST /upload reads and discards.
cat >"$work/app.py" <<PY
import http.server, socketserver
CHUNK = b"\0" * (1 << 20)
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        self.send_response(200); self.send_header("content-length", str($SIZE_MIB << 20)); self.end_headers()
        for _ in range($SIZE_MIB): self.wfile.write(CHUNK)
    def do_POST(self):
        n = 0
        if self.headers.get("transfer-encoding", "") == "chunked":
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0: self.rfile.readline(); break
                left = size
                while left: got = len(self.rfile.read(min(left, 1 << 20))); left -= got; n += got
                self.rfile.readline()
        else:
            left = int(self.headers["content-length"])
            while left: got = len(self.rfile.read(min(left, 1 << 20))); left -= got; n += got
        body = str(n).encode()
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers(); self.wfile.write(body)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("127.0.0.1", $APP), H).serve_forever()
PY
python3 "$work/app.py" & pids+=($!)
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$APP") 2>/dev/null && break; sleep 0.1; done

"$SEAM" certs init --dir "$work/certs" --trust-domain mesh.local --service orders --service billing >/dev/null
conf() { # service outbound inbound admin upstream peers
  cat >"$work/$1.yaml" <<Y
service: $1
trust_domain: mesh.local
listen: { outbound: 127.0.0.1:$2, inbound: 127.0.0.1:$3, admin: 127.0.0.1:$4 }
upstream: http://127.0.0.1:$5
tls: { ca: certs/ca.crt, cert: certs/$1/tls.crt, key: certs/$1/tls.key }
peers: $6
timeouts: { connect: 1s, request: 300s, drain: 5s }
runtime: { worker_threads: 1 }
Y
}
conf billing "$BB" "$BI" "$BA" "$APP" "{}"
conf orders "$OB" "$OI" "$OA" 9 "{ billing: [127.0.0.1:$BI] }"
RUST_LOG=warn "$SEAM" run --config "$work/billing.yaml" & pids+=($!); billing=$!
RUST_LOG=warn "$SEAM" run --config "$work/orders.yaml" & pids+=($!); orders=$!
for a in "$OA" "$BA"; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$a/ready" >/dev/null && break; sleep 0.1; done
done

hwm() { awk '/VmHWM/{print $2" kB"}' "/proc/$1/status"; }
echo "after start:    orders $(hwm $orders), billing $(hwm $billing)"
curl -sf --noproxy '*' -H 'Host: billing' "http://127.0.0.1:$OB/small" -o /dev/null -w '' || true
start=$(date +%s.%N)
got=$(curl -sf --noproxy '*' -H 'Host: billing' -o /dev/null -w '%{size_download}' "http://127.0.0.1:$OB/download")
t=$(echo "$(date +%s.%N) - $start" | bc)
echo "download ${got} bytes in ${t}s: orders $(hwm $orders), billing $(hwm $billing)"
start=$(date +%s.%N)
up=$(head -c $((SIZE_MIB << 20)) /dev/zero | curl -sf --noproxy '*' -H 'Host: billing' -H 'Transfer-Encoding: chunked' -T - -X POST "http://127.0.0.1:$OB/upload")
t=$(echo "$(date +%s.%N) - $start" | bc)
echo "upload   ${up} bytes in ${t}s: orders $(hwm $orders), billing $(hwm $billing)"
[ "$got" = $((SIZE_MIB << 20)) ] && [ "$up" = $((SIZE_MIB << 20)) ] || { echo "size mismatch"; exit 1; }
