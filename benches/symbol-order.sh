#!/usr/bin/env bash
# Rewrites benches/symbol-order.txt, the list of functions a running seam executes, which
# build.rs hands to the linker so that they sit together in release builds (see build.rs
# for why: it keeps about 3.4 MiB of code out of each seam's resident set).
#
#   benches/symbol-order.sh      # builds release, then runs the harness pair under callgrind
#
# The list comes from a whole life of the pair in the shared load harness (../shared/bench,
# run its setup.sh once): start-up, each of the four cases, every admin endpoint, shutdown.
# callgrind sees every function that runs at least once, however briefly; a sampling
# profiler would miss the start-up code, which stays resident too. Hottest first, then
# aws-lc's AVX-512 AES-GCM, which valgrind's emulated CPU never selects. Names are mangled
# with hashes that change with the compiler version, so rerun it after a toolchain update
# or a large change; a stale list costs only layout, never correctness. Takes about 2 min.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
[ -n "${SKIP_BUILD:-}" ] || cargo build --release --quiet --manifest-path "$ROOT/Cargo.toml"
eval "$(SKIP_BUILD=1 bash "$ROOT/benches/mesh-compare.sh" env)"
HARNESS=${HARNESS:-$ROOT/../shared/bench}
# shellcheck source=/dev/null
source "$HARNESS/lib.sh"
SEAM=${CARGO_TARGET_DIR:-$ROOT/target}/release/seam

out=$(mktemp -d)
trap 'bash "$HARNESS/topo.sh" ours stop >/dev/null 2>&1 || true; rm -rf "$out"' EXIT
vg="valgrind --tool=callgrind --demangle=no --dump-instr=no --callgrind-out-file=$out/cg.%p"
export MESH_A_CMD=${MESH_A_CMD/"$SEAM run"/"$vg $SEAM run"}
export MESH_B_CMD=${MESH_B_CMD/"$SEAM run"/"$vg $SEAM run"}

bash "$HARNESS/topo.sh" ours start >/dev/null
h2load -t1 -c16 -m10 -n 2000 "http://127.0.0.1:$A_H2C_PORT/1k" | grep -E "^requests:"
h2load --h1 -t1 -c32 -n 2000 "http://127.0.0.1:$A_H1_PORT/1k" | grep -E "^requests:"
h2load -t1 -c16 -m10 -n 200 "http://127.0.0.1:$A_H2C_PORT/1m" | grep -E "^requests:"
h2load --h1 -t1 -c32 -n 100 "http://127.0.0.1:$A_H1_PORT/1m" | grep -E "^requests:"
for port in $(sed -n 's/^ *admin: 127.0.0.1://p' "$STATE/seam/a.yaml" "$STATE/seam/b.yaml"); do
  for path in live ready health stats metrics sessions; do
    curl -s -o /dev/null --noproxy '*' "http://127.0.0.1:$port/$path"
  done
done
# callgrind writes its profile when seam exits on SIGTERM.
bash "$HARNESS/topo.sh" ours stop >/dev/null

nm --defined-only "$SEAM" | awk 'NF == 3 && $2 ~ /^[tTwW]$/ {print $3}' >"$out/symbols"
python3 - "$out/symbols" "$out"/cg.* >"$out/order" <<'PY'
import collections, re, sys
symbols = set(open(sys.argv[1]).read().split())
cost = collections.Counter()
for path in sys.argv[2:]:
    names = {"ob": {}, "fn": {}}
    in_seam, fn, after_call = False, None, False
    for line in open(path, errors="replace"):
        m = re.match(r"(c?)(ob|fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
        if m:
            called, kind, key, name = m.groups()
            if name is not None:
                names[kind][key] = name
            if not called and kind == "ob":
                in_seam = names["ob"].get(key, "").endswith("/seam")
            elif not called:
                fn = names["fn"].get(key)
                if in_seam:
                    cost.setdefault(fn, 0)
        elif line.startswith("calls="):
            after_call = True  # the next cost line is the call's, not the function's own
        elif line[:1].isdigit() or line[:1] in "+-*":
            if in_seam and not after_call:
                cost[fn] += int(line.split()[1])
            after_call = False
ran = [n for n, _ in sorted(cost.items(), key=lambda kv: -kv[1]) if n in symbols]
avx512 = sorted(s for s in symbols if re.search(r"aws_lc.*(avx512|vaes|vpclmul|avx10)", s) and s not in cost)
if len(ran) < 100:
    sys.exit(f"only {len(ran)} of seam's functions in the profiles; did callgrind write them?")
print("\n".join(ran + avx512))
sys.stderr.write(f"{len(ran)} functions ran, {len(avx512)} AVX-512 ones added\n")
PY
mv "$out/order" "$ROOT/benches/symbol-order.txt"
echo "wrote benches/symbol-order.txt ($(wc -l <"$ROOT/benches/symbol-order.txt") names)"
