#!/usr/bin/env bash
# Multi-LoRA on one H100 with L8 (dummy bf16 weights) and eight dummy rank-16 adapters on all seven projections.
#
#     STAGES="offline" OUT=/some/folder bash benchmarks/lora_h100.sh             # ~4 min
#     STAGES="alone fair fcfs" OUT=/some/folder bash benchmarks/lora_h100.sh     # ~8 min
#     LORA_SMOKE=1 OUT=/tmp/lora bash benchmarks/lora_h100.sh                    # CPU rehearsal: tiny model
#
# Stages (each with its own time limit):
#   offline  `bench throughput --workload W1 --num-loras 8 --lora-rank 16`: the engine without LoRA, then with
#            the adapters, requests spread evenly over them; target: LoRA output tok/s >= 0.8x the base's
#   alone    `sluice serve` with the adapters (--lora-scheduling fair), then `bench serve --lora-mix` with the
#            seven light adapters only, each at LIGHT_RATE req/s (Poisson): their TTFT without the noisy one
#   fair     the same server, the light adapters as before plus lora-0 at 8x a light adapter's rate
#   fcfs     a server with --lora-scheduling fcfs, the same mix as fair (for contrast)
#   target: the light adapters' p99 TTFT under fair <= 2x their p99 alone (summary.json, also per adapter)
# Knobs (environment): STAGES, LIGHT_RATE (default 2.5 req/s per light adapter: 17.5 req/s alone, 37.5 with the
# noisy one, about what the engine finishes per second on W1), ARRIVAL_S (default 40 s of arrivals per mix),
# ENGINE_FLAGS (default: bf16, dummy weights), BUDGET_S (default 570), PYTHON.
source "$(dirname "$0")/device_common.sh"
SMOKE=${LORA_SMOKE:-0}
BUDGET_S=${BUDGET_S:-570}
STAGES=${STAGES:-"offline alone fair fcfs"}
LIGHT_RATE=${LIGHT_RATE:-2.5}
ARRIVAL_S=${ARRIVAL_S:-40}
if [[ "$SMOKE" == 1 ]]; then
  ENGINE_FLAGS=${ENGINE_FLAGS:-"--device cpu --dtype float32 --load-format dummy --num-kv-blocks 1024 --max-num-batched-tokens 256"}
  SCALE=0.05 N_OFFLINE=16 RANK=4 ARRIVAL_S=${LORA_SMOKE_ARRIVAL_S:-2}
else
  ENGINE_FLAGS=${ENGINE_FLAGS:-"--dtype bfloat16 --load-format dummy"}
  SCALE=1.0 N_OFFLINE=1000 RANK=16
fi
read -r -a ENGINE <<< "$ENGINE_FLAGS"
LORA_FLAGS=(--enable-lora --max-loras 8 --max-lora-rank "$RANK")

# ---- packages (as benchmarks/serve_h100.sh) and the model folder -------------------------------------------------
DEPS=$(mktemp -d)
if [[ -d .whl && "$SMOKE" != 1 ]]; then
  log "installing the server's wheels from .whl/"
  timeout 120 "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --find-links .whl \
    --target "$DEPS" fastapi uvicorn pydantic msgspec pyzmq prometheus_client httpx >"$OUT/pip.log" 2>&1 \
    || { log "pip install failed:"; cat "$OUT/pip.log"; exit 1; }
  export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
fi
WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID"; fi
  rm -rf "$WORK" "$DEPS"
}
trap cleanup EXIT
TINY_FLAGS=(); if [[ "$SMOKE" == 1 ]]; then TINY_FLAGS=(--tiny --max-position-embeddings 2048); fi
MODEL_DIR=$("$PYTHON" benchmarks/model_dir.py "$WORK" "${TINY_FLAGS[@]}") || { log "could not write the model folder"; exit 1; }
VOCAB=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1] + '/config.json'))['vocab_size'])" "$MODEL_DIR")

# ---- offline: base vs LoRA ----------------------------------------------------------------------------------------
if wanted offline; then
  OFFLINE_MODEL=(--model L8 --tokenizer "$MODEL_DIR" --disable-detokenize)
  if [[ "$SMOKE" == 1 ]]; then OFFLINE_MODEL=(--model "$MODEL_DIR"); fi
  reserve=0; for s in alone fair fcfs; do wanted "$s" && reserve=$(( reserve + 110 )); done
  limit=$(stage_limit 330 "$reserve")
  log "offline W1, base then 8 adapters of rank $RANK (limit ${limit}s)"
  timeout "$limit" "$PYTHON" -m sluice.entrypoints.cli bench throughput --workload W1 --num-prompts "$N_OFFLINE" \
    --length-scale "$SCALE" "${OFFLINE_MODEL[@]}" "${ENGINE[@]}" --num-loras 8 --lora-rank "$RANK" \
    --no-progress --output-json "$OUT/throughput_W1_lora.json" >"$OUT/throughput_W1_lora.log" 2>&1 \
    || log "offline run exited with $? (124: timed out); see throughput_W1_lora.log"
  tail -7 "$OUT/throughput_W1_lora.log" | sed 's/^/    /'
fi

# ---- online: the fairness runs --------------------------------------------------------------------------------------
LIGHT_MIX=(lora-1:1 lora-2:1 lora-3:1 lora-4:1 lora-5:1 lora-6:1 lora-7:1)
if wanted alone || wanted fair || wanted fcfs; then
  log "writing 8 adapters of rank $RANK"
  MODULES=$("$PYTHON" -m sluice.entrypoints.cli bench make-loras --model "$MODEL_DIR" --num-loras 8 \
    --lora-rank "$RANK" --out "$WORK/loras") || { log "make-loras failed"; exit 1; }
  read -r -a MODULES <<< "${MODULES#--lora-modules }"
fi

start_server() {  # scheduling policy
  PORT=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  BASE_URL="http://127.0.0.1:$PORT"
  log "starting sluice serve, --lora-scheduling $1"
  "$PYTHON" -m sluice.entrypoints.cli serve "$MODEL_DIR" --served-model-name L8 --host 127.0.0.1 --port "$PORT" \
    --disable-uvicorn-access-log "${ENGINE[@]}" "${LORA_FLAGS[@]}" --lora-scheduling "$1" \
    --lora-modules "${MODULES[@]}" >"$OUT/server_$1.log" 2>&1 &
  SERVER_PID=$!
  local deadline=$(( $(date +%s) + 240 ))
  while (( $(date +%s) < deadline )); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    if "$PYTHON" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).status != 200)" \
         "$BASE_URL/health" 2>/dev/null; then log "server healthy"; return 0; fi
    sleep 1
  done
  log "the server did not become healthy:"; tail -30 "$OUT/server_$1.log"; return 1
}
stop_server() {
  [[ -n "$SERVER_PID" ]] || return
  kill -TERM "$SERVER_PID"
  for (( i = 0; i < 60; i++ )); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
  kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID"
  wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
}
bench_mix() {  # name, total rate, then the mix
  local name=$1 rate=$2; shift 2
  local n; n=$("$PYTHON" -c "import sys; print(max(8, round(float(sys.argv[1]) * float(sys.argv[2]))))" "$rate" "$ARRIVAL_S")
  local limit; limit=$(stage_limit $(( ARRIVAL_S + 60 )) 0)
  if (( limit == 0 )); then log "bench serve $name: skipped, out of time"; return; fi
  log "bench serve $name: $n requests at $rate req/s, mix $*"
  timeout "$limit" "$PYTHON" -m sluice.entrypoints.cli bench serve --base-url "$BASE_URL" --model L8 \
    --vocab-size "$VOCAB" --length-scale "$SCALE" --num-prompts "$n" --request-rate "$rate" --no-progress \
    --num-warmup-prompts 8 --lora-mix "$@" --output-json "$OUT/serve_lora_$name.json" >"$OUT/serve_lora_$name.log" 2>&1 \
    || log "bench serve $name exited with $? (124: timed out)"
  sed -n '/Per adapter/,/====/p' "$OUT/serve_lora_$name.log" | sed 's/^/    /'
}
LIGHT_TOTAL=$("$PYTHON" -c "print(7 * $LIGHT_RATE)")
MIX_TOTAL=$("$PYTHON" -c "print(15 * $LIGHT_RATE)")
if wanted alone || wanted fair; then
  if start_server fair; then
    wanted alone && bench_mix alone "$LIGHT_TOTAL" "${LIGHT_MIX[@]}"
    wanted fair && bench_mix fair "$MIX_TOTAL" lora-0:8 "${LIGHT_MIX[@]}"
  fi
  stop_server
fi
if wanted fcfs; then
  if start_server fcfs; then bench_mix fcfs "$MIX_TOTAL" lora-0:8 "${LIGHT_MIX[@]}"; fi
  stop_server
fi

# ---- summary ------------------------------------------------------------------------------------------------------
"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
load = lambda name: json.load(open(p)) if os.path.exists(p := os.path.join(out, name)) else None
offline, alone, fair, fcfs = (load(n) for n in ("throughput_W1_lora.json", "serve_lora_alone.json",
                                                 "serve_lora_fair.json", "serve_lora_fcfs.json"))
summary = {"device": (offline or fair or alone or {}).get("device"), "checks": []}
def check(name, value, op, target):
    met = None if value is None else (value >= target if op == ">=" else value <= target)
    summary["checks"].append({"target": f"{name} {op} {target}", "measured": value, "met": met})
check("LoRA / base output tok/s", offline and offline.get("lora_over_base"), ">=", 0.8)
if offline:
    summary["offline"] = {"base_output_tokens_per_s": offline["engine_base"]["output_tokens_per_s"],
                          "lora_output_tokens_per_s": offline["engine"]["output_tokens_per_s"]}
def light_p99(run):
    return run and run["engine"].get("light_adapters", run["engine"])["ttft_ms_p99"]
for name, run in (("fair", fair), ("fcfs", fcfs)):
    ratio = alone and run and light_p99(run) / light_p99(alone)
    summary[f"{name}_light_p99_over_alone"] = ratio
    if name == "fair":
        check("fair: light adapters' p99 TTFT with the noisy one / alone", ratio, "<=", 2.0)
    if alone and run:
        worst = max(run["engine"]["per_adapter"][a]["ttft_ms_p99"] / m["ttft_ms_p99"]
                    for a, m in alone["engine"]["per_adapter"].items() if a in run["engine"]["per_adapter"])
        summary[f"{name}_worst_light_adapter_p99_ratio"] = worst
    summary[f"{name}_light_p99_ttft_ms"] = light_p99(run)
summary["alone_light_p99_ttft_ms"] = light_p99(alone)
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
for c in summary["checks"]:
    measured = "missing" if c["measured"] is None else f"{c['measured']:.3f}"
    print(f"    {'ok  ' if c['met'] else 'MISS' if c['met'] is False else '??  '} {c['target']:<72} {measured}")
EOF
log "done; results in $OUT"
