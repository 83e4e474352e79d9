#!/usr/bin/env bash
# Schema-driven fuzzing of a live qlorad against its own /openapi.json, three ways: with a valid
# API key, with none, and with a wrong one. Passes when no request gets a 5xx or crashes the
# server, and (from /metrics, asked with the admin key) no request without a valid key got
# anything but 401 on a protected route, i.e. none reached a handler.
#
#   cargo build && scripts/fuzz_api.sh [MAX_EXAMPLES]          # needs schemathesis (its `st` command)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100}
ST=${ST:-st}
WORK=$(mktemp -d /tmp/qlorad-fuzz-XXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE=http://127.0.0.1:$PORT
python3 -c "import sys; sys.path.insert(0, 'scripts'); from qlorad_harness import ensure_model; ensure_model('$WORK/models')"
printf 'alice:alice-fuzz-key-0123456789\nroot:root-fuzz-key-0123456789:admin\n' > "$WORK/keys"
# No workers: fuzzed jobs only queue. Generous per-key limits so the run measures handlers.
QLORAD_LIMITS__MAX_QUEUED_JOBS_PER_KEY=100000 QLORAD_AUTH__PUBLIC_METRICS=false QLORAD_WORKERS__DEVICES='[]' \
  target/debug/qlorad serve --listen 127.0.0.1:$PORT --data-dir "$WORK/data" --model-root "$WORK/models" \
  --api-keys-file "$WORK/keys" >"$WORK/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf $BASE/healthz >/dev/null && break; sleep 0.1; done
run() {  # name, extra args...
  local name=$1; shift
  echo "== $name"
  "$ST" run "$BASE/openapi.json" --checks not_a_server_error --max-examples "$N" -w 2 \
    --report junit --report-junit-path "$WORK/$name.xml" "$@" >"$WORK/$name.txt" 2>&1 || true
  tail -n 15 "$WORK/$name.txt"
  python3 - "$WORK/$name.xml" <<'PY'
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(f"junit: tests={s.get('tests')} failures={s.get('failures')} errors={s.get('errors')}")
PY
}
metrics() { curl -s -H "Authorization: Bearer root-fuzz-key-0123456789" $BASE/metrics > "$WORK/$1"; }
metrics m0.txt
run no_key
run wrong_key -H "Authorization: Bearer not-a-key"
metrics m1.txt
run with_key -H "Authorization: Bearer alice-fuzz-key-0123456789"
metrics m2.txt
kill -0 $PID && echo "server still up (pid $PID)"
python3 - "$WORK" <<'PY'
import re, sys
def load(name):
    out = {}
    for line in open(f"{sys.argv[1]}/{name}"):
        m = re.match(r'qlorad_http_requests_total\{route="([^"]*)",method="([^"]*)",status="(\d+)"\} (\d+)', line)
        if m:
            out[(m.group(1), m.group(2), int(m.group(3)))] = int(m.group(4))
    return out
m0, m1, m2 = load("m0.txt"), load("m1.txt"), load("m2.txt")
public = {"/", "/healthz", "/openapi.json", "/dashboard/{name}"}
def diff(a, b):
    return {k: b[k] - a.get(k, 0) for k in b if b[k] - a.get(k, 0) > 0}
unauth = diff(m0, m1)
by_status = {}
leaks = {}
for (route, method, status), n in unauth.items():
    by_status[status] = by_status.get(status, 0) + n
    # the metrics scrape itself (admin key) is the only authorized request in the window
    if route not in public and status != 401 and route != "/metrics":
        leaks[f"{method} {route} {status}"] = n
keyed = diff(m1, m2)
keyed_status = {}
for (_, _, status), n in keyed.items():
    keyed_status[status] = keyed_status.get(status, 0) + n
print("without a valid key, responses by status:", dict(sorted(by_status.items())))
print("without a valid key, non-401 answers on protected routes:", leaks or "none")
print("with a key, responses by status:", dict(sorted(keyed_status.items())))
fivexx = sum(n for (_, _, s), n in m2.items() if s >= 500)
print("5xx responses over all runs:", fivexx)
sys.exit(1 if fivexx or leaks else 0)
PY
grep -c ' ERROR \| panicked' "$WORK/server.log" | sed 's/^/server log errors or panics: /' || true
echo "work dir: $WORK"
