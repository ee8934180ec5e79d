#!/usr/bin/env bash
# W5 (docs/benchmarks.md) on one H100 with L8, and the server-overhead check of issue #7, in one device call (< 9 min).
#
#     OUT=/some/folder bash benchmarks/serve_h100.sh            # on the device, from the repository root
#     SERVE_SMOKE=1 OUT=/tmp/w5 bash benchmarks/serve_h100.sh   # CPU rehearsal: tiny model, tiny numbers
#
# Steps, each with its own time limit so one hung stage cannot eat the rest:
#   1. installs the server's wheels from .whl/ (benchmarks/fetch_device_wheels.sh) into a scratch folder on
#      PYTHONPATH (nothing is downloaded, the system packages stay as they are)
#   2. writes L8 as a config-only folder with a small tokenizer (token-id prompts; detokenizing ids past its
#      vocabulary gives empty text, so the server still does its per-token work)
#   3. `sluice serve` on it (dummy weights), then `sluice bench serve`: rate inf with 1000 W1 requests, rate 4
#      and rate 16 (about 30 s of arrivals each), and rate 16 with 32K-token prompts among the short chats
#   4. stops the server and runs `sluice bench throughput --workload W1` offline with the same engine flags
#   5. summary.json: the issue's targets next to what was measured
# Every result JSON lands in $OUT; server.log and each stage's output too.
#
# Knobs (environment): STAGES (default "rate-inf rate-4 rate-16 long-prompts offline": the stages to run),
# ENGINE_FLAGS (default: bf16, dummy weights, 224 requests, 8192-token steps, 256-token prompt chunks), API_SERVER_COUNT (default 1),
# OFFLINE_FLAGS (extra flags for the offline run, e.g. --disable-detokenize), BUDGET_S (default 540: stages are
# cut short or skipped so that the whole run ends by then), SLUICE_COMMIT (recorded in the results when the copy
# of the tree has no .git), PYTHON.
source "$(dirname "$0")/device_common.sh"
SMOKE=${SERVE_SMOKE:-0}
BUDGET_S=${BUDGET_S:-540}

if [[ "$SMOKE" == 1 ]]; then
  smoke_flags="--device cpu --dtype float32 --load-format dummy --num-kv-blocks 1024 --max-num-batched-tokens 256"
  ENGINE_FLAGS=${ENGINE_FLAGS:-$smoke_flags}
  N_INF=16 N_RATE4=8 N_RATE16=16 N_MIX=16 LONG_LEN=512 LONG_COUNT=2 SCALE=0.1
else
  # 224 running requests: mean TPOT under 20 ms at rate inf (256 gave 20.7 ms on the H100); 256-token
  # prompt chunks keep the steps short enough that streams never wait long on a long prompt's prefill.
  ENGINE_FLAGS=${ENGINE_FLAGS:-"--dtype bfloat16 --load-format dummy --max-num-seqs 224 --max-num-batched-tokens 8192 --long-prefill-token-threshold 256"}
  N_INF=1000 N_RATE4=120 N_RATE16=480 N_MIX=320 LONG_LEN=32768 LONG_COUNT=4 SCALE=1.0
fi
OFFLINE_RESERVE=170  # seconds kept for the offline run (model load, warmup, 1000 requests) and the summary
STAGES=${STAGES:-"rate-inf rate-4 rate-16 long-prompts offline"}
if ! wanted offline; then OFFLINE_RESERVE=10; fi
API_SERVER_COUNT=${API_SERVER_COUNT:-1}
read -r -a ENGINE <<< "$ENGINE_FLAGS"
read -r -a OFFLINE_EXTRA <<< "${OFFLINE_FLAGS:-}"

# ---- 1. packages ----------------------------------------------------------------------------------------------
DEPS=$(mktemp -d)
SERVER_PACKAGES=(fastapi uvicorn pydantic msgspec pyzmq prometheus_client httpx)
if [[ -d .whl && "$SMOKE" == 1 ]]; then
  # The rehearsal's Python is not the device's: resolve the device's install (3.12 wheels) without using it.
  log "checking that .whl/ resolves for the device (Python 3.12)"
  timeout 120 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links .whl \
    --only-binary=:all: --python-version 3.12 --target "$DEPS" "${SERVER_PACKAGES[@]}" >"$OUT/pip.log" 2>&1 \
    || { log "the offline install does not resolve:"; cat "$OUT/pip.log"; exit 1; }
elif [[ -d .whl ]]; then
  log "installing the server's wheels from .whl/"
  timeout 120 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links .whl \
    --target "$DEPS" "${SERVER_PACKAGES[@]}" >"$OUT/pip.log" 2>&1 \
    || { log "pip install failed:"; cat "$OUT/pip.log"; exit 1; }
  export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
else
  log "no .whl/ folder: using the packages already installed"
fi

# ---- 2. the model folder --------------------------------------------------------------------------------------
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID"; fi
  rm -rf "$WORK" "$DEPS"
}
trap cleanup EXIT
log "writing the model folder"
TINY_FLAGS=(); if [[ "$SMOKE" == 1 ]]; then TINY_FLAGS=(--tiny --max-position-embeddings 2048); fi
MODEL_DIR=$("$PYTHON" benchmarks/model_dir.py "$WORK" "${TINY_FLAGS[@]}") || { log "could not write the model folder"; exit 1; }
VOCAB=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1] + '/config.json'))['vocab_size'])" "$MODEL_DIR")

# ---- 3. the server and W5 -------------------------------------------------------------------------------------
PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
BASE_URL="http://127.0.0.1:$PORT"
log "starting sluice serve ($API_SERVER_COUNT API server(s)) on port $PORT: ${ENGINE[*]}"
"$PYTHON" -m sluice.entrypoints.cli serve "$MODEL_DIR" --served-model-name L8 --host 127.0.0.1 --port "$PORT" \
  --api-server-count "$API_SERVER_COUNT" --disable-uvicorn-access-log "${ENGINE[@]}" >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
healthy=0
health_deadline=$(( $(date +%s) + $(stage_limit 300 "$OFFLINE_RESERVE") ))
while (( $(date +%s) < health_deadline )); do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then break; fi
  if "$PYTHON" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).status != 200)" \
       "$BASE_URL/health" 2>/dev/null; then healthy=1; break; fi
  sleep 1
done
if (( ! healthy )); then
  log "the server did not become healthy; last lines of server.log:"; tail -40 "$OUT/server.log"; exit 1
fi
log "server healthy"

bench_serve() {  # name, seconds it may take, then bench serve flags
  if ! wanted "$1"; then return; fi
  local name=$1 limit; limit=$(stage_limit "$2" "$OFFLINE_RESERVE"); shift 2
  if (( limit == 0 )); then log "bench serve $name: skipped, out of time"; return; fi
  log "bench serve $name (limit ${limit}s): $*"
  timeout "$limit" "$PYTHON" -m sluice.entrypoints.cli bench serve --base-url "$BASE_URL" --model L8 \
    --vocab-size "$VOCAB" --length-scale "$SCALE" --no-progress --output-json "$OUT/serve_$name.json" "$@" \
    >"$OUT/serve_$name.log" 2>&1
  local status=$?
  grep -E "Successful|Failed requests|Output token throughput|Mean TPOT|Median TTFT|Median ITL|P99 ITL|P99 / median" \
    "$OUT/serve_$name.log" | sed 's/^/    /'
  (( status == 0 )) || log "bench serve $name exited with $status (124: timed out); see serve_$name.log"
}
bench_serve rate-inf 150 --num-prompts "$N_INF" --request-rate inf --num-warmup-prompts 16
bench_serve rate-4 90 --num-prompts "$N_RATE4" --request-rate 4
bench_serve rate-16 90 --num-prompts "$N_RATE16" --request-rate 16
bench_serve long-prompts 90 --num-prompts "$N_MIX" --request-rate 16 --long-prompt-len "$LONG_LEN" \
  --num-long-prompts "$LONG_COUNT" --long-prompt-output-len 16

log "stopping the server"
kill -TERM "$SERVER_PID"
for (( i = 0; i < 60; i++ )); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
if kill -0 "$SERVER_PID" 2>/dev/null; then log "the server did not stop: killing it"; kill -KILL "$SERVER_PID"; fi
wait "$SERVER_PID"
log "server exited with $?"
SERVER_PID=""

# ---- 4. offline W1 with the same engine flags -------------------------------------------------------------------
OFFLINE_MODEL=(--model L8 --tokenizer "$MODEL_DIR")  # the same config folder, written again by `bench throughput`
if [[ "$SMOKE" == 1 ]]; then OFFLINE_MODEL=(--model "$MODEL_DIR"); fi
offline_limit=$(stage_limit 240 10)
if ! wanted offline; then
  log "offline bench throughput: not among STAGES"
elif (( offline_limit > 0 )); then
  log "offline bench throughput W1 (${N_INF} requests, limit ${offline_limit}s)"
  timeout "$offline_limit" "$PYTHON" -m sluice.entrypoints.cli bench throughput --workload W1 \
    --num-prompts "$N_INF" --length-scale "$SCALE" "${OFFLINE_MODEL[@]}" "${ENGINE[@]}" "${OFFLINE_EXTRA[@]}" \
    --no-progress --output-json "$OUT/throughput_W1.json" >"$OUT/throughput_W1.log" 2>&1 \
    || log "offline run exited with $? (124: timed out); see throughput_W1.log"
  tail -4 "$OUT/throughput_W1.log" | sed 's/^/    /'
else
  log "offline bench throughput: skipped, out of time"
fi

# ---- 5. summary ------------------------------------------------------------------------------------------------
"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]

def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None

inf, r4, r16, mix, offline = (load(n) for n in ("serve_rate-inf.json", "serve_rate-4.json", "serve_rate-16.json",
                                                 "serve_long-prompts.json", "throughput_W1.json"))
checks = []
def check(name, value, op, target):
    ok = None if value is None else (value >= target if op == ">=" else value < target)
    checks.append({"target": f"{name} {op} {target}", "measured": value, "met": ok})

e = inf and inf["engine"]
check("rate inf output tok/s", e and e["output_tokens_per_s"], ">=", 6600)
check("rate inf mean TPOT ms", e and e["tpot_ms_mean"], "<", 20)
for label, run in (("rate 4", r4), ("rate 16", r16)):
    check(f"{label} median TTFT ms", run and run["engine"]["ttft_ms_p50"], "<", 50)
    check(f"{label} median ITL ms", run and run["engine"]["itl_ms_p50"], "<", 15)
short = mix and mix["engine"].get("short_requests")
check("long-prompt mix: short requests' ITL p99 / p50", short and short["itl_p99_over_p50"], "<", 5)
offline_tps = offline and offline["engine"]["output_tokens_per_s"]
ratio = e and offline_tps and e["output_tokens_per_s"] / offline_tps
check("server / offline output tok/s (rate inf, same requests)", ratio, ">=", 0.9)
summary = {"device": (inf or offline or {}).get("device"), "sluice_commit": (inf or offline or {}).get("sluice_commit"),
           "offline_output_tokens_per_s": offline_tps, "checks": checks}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
for c in checks:
    measured = "missing" if c["measured"] is None else f"{c['measured']:.3f}"
    print(f"    {'ok  ' if c['met'] else 'MISS' if c['met'] is False else '??  '} {c['target']:<62} {measured}")
EOF
log "done; results in $OUT"
