#!/usr/bin/env bash
# The KV tiers' targets on one H100 with L8 (dummy weights), in one device call (< 10 min):
#   1. W8 multi-turn through `sluice serve` at --gpu-memory-utilization 0.5, without and with the host prefix tier
#      (--kv-offload-space): later turns' median TTFT and the hit rate of each tier
#   2. a preemption-heavy W3 (a KV pool forced small): --preemption-mode recompute vs auto with --swap-space, at
#      W3's lengths and at 4x them (contexts to 8K)
#
#     OUT=/some/folder bash benchmarks/kv_tiers_h100.sh            # on the device, from the repository root
#     KV_SMOKE=1 OUT=/tmp/kv bash benchmarks/kv_tiers_h100.sh      # CPU rehearsal: tiny model, tiny numbers
#
# Knobs (environment): STAGES (default "w8 w3 w3-8k"), W8_CONVERSATIONS (200), W8_RATE (conversations/s, 2),
# W8_THINK (mean think time between turns, seconds, 10), OFFLOAD_GIB (64), SWAP_GIB (32), PYTHON.
# Server flags of the .whl install: see benchmarks/serve_h100.sh.
source "$(dirname "$0")/device_common.sh"
SMOKE=${KV_SMOKE:-0}
STAGES=${STAGES:-"w8 w3 w3-8k"}

if [[ "$SMOKE" == 1 ]]; then
  BASE=(--device cpu --dtype float32 --load-format dummy --max-num-batched-tokens 256)
  W8_POOL=(--num-kv-blocks 96 --block-size 16) W8_CONVERSATIONS=${W8_CONVERSATIONS:-4} W8_SCALE=0.05 W8_THINK=${W8_THINK:-0.2}
  W3_POOL=(--num-kv-blocks 64) W3_N=8 W3_8K_N=4 SCALE=0.1 SCALE_8K=0.4 OFFLOAD_GIB=${OFFLOAD_GIB:-0.05} SWAP_GIB=${SWAP_GIB:-0.05}
else
  BASE=(--dtype bfloat16 --load-format dummy)
  W8_POOL=(--gpu-memory-utilization 0.5) W8_CONVERSATIONS=${W8_CONVERSATIONS:-200} W8_SCALE=1.0
  # 4096 blocks of 16 tokens hold 64K tokens: W3's 256 requests want about 4x that at once.
  W3_POOL=(--num-kv-blocks 4096) W3_N=256 W3_8K_N=32 SCALE=1.0 SCALE_8K=4 OFFLOAD_GIB=${OFFLOAD_GIB:-64} SWAP_GIB=${SWAP_GIB:-32}
fi
W8_RATE=${W8_RATE:-2}
W8_THINK=${W8_THINK:-10}

WORK=$(mktemp -d)
SERVER_PID=""
cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then kill -KILL "$SERVER_PID"; fi
  rm -rf "$WORK"
}
trap cleanup EXIT
TINY_FLAGS=(); if [[ "$SMOKE" == 1 ]]; then TINY_FLAGS=(--tiny --max-position-embeddings 4096); fi
MODEL_DIR=$("$PYTHON" benchmarks/model_dir.py "$WORK" "${TINY_FLAGS[@]}") || { log "could not write the model folder"; exit 1; }
VOCAB=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1] + '/config.json'))['vocab_size'])" "$MODEL_DIR")

w8() {  # name, then server flags
  local name=$1; shift
  local port; port=$("$PYTHON" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  log "W8 $name: sluice serve ${BASE[*]} ${W8_POOL[*]} $*"
  "$PYTHON" -m sluice.entrypoints.cli serve "$MODEL_DIR" --served-model-name L8 --host 127.0.0.1 --port "$port" \
    --disable-uvicorn-access-log "${BASE[@]}" "${W8_POOL[@]}" "$@" >"$OUT/server_w8_$name.log" 2>&1 &
  SERVER_PID=$!
  local healthy=0
  for (( i = 0; i < 240; i++ )); do
    kill -0 "$SERVER_PID" 2>/dev/null || break
    if "$PYTHON" -c "import sys, urllib.request; sys.exit(urllib.request.urlopen(sys.argv[1], timeout=2).status != 200)" \
         "http://127.0.0.1:$port/health" 2>/dev/null; then healthy=1; break; fi
    sleep 1
  done
  if (( healthy )); then
    timeout 240 "$PYTHON" -m sluice.entrypoints.cli bench serve --workload W8 --base-url "http://127.0.0.1:$port" \
      --model L8 --vocab-size "$VOCAB" --num-conversations "$W8_CONVERSATIONS" --request-rate "$W8_RATE" \
      --think-time "$W8_THINK" --length-scale "$W8_SCALE" --no-progress --output-json "$OUT/w8_$name.json" >"$OUT/w8_$name.log" 2>&1 \
      || log "bench serve W8 $name exited with $?"
    tail -25 "$OUT/w8_$name.log" | sed 's/^/    /'
  else
    log "the server did not become healthy:"; tail -30 "$OUT/server_w8_$name.log"
  fi
  kill -TERM "$SERVER_PID" 2>/dev/null
  for (( i = 0; i < 60; i++ )); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
  kill -KILL "$SERVER_PID" 2>/dev/null
  SERVER_PID=""
}

w3() {  # name, limit, then throughput flags
  local name=$1 limit=$2; shift 2
  log "W3 $name: $*"
  timeout "$limit" "$PYTHON" -m sluice.entrypoints.cli bench throughput --model L8 --tokenizer "$MODEL_DIR" \
    --disable-detokenize --workload W3 "${BASE[@]}" "${W3_POOL[@]}" "$@" --no-progress \
    --output-json "$OUT/w3_$name.json" >"$OUT/w3_$name.log" 2>&1 || log "W3 $name exited with $?"
  grep -iE "output tok|preempt|swap" "$OUT/w3_$name.log" | tail -6 | sed 's/^/    /'
}
if [[ "$SMOKE" == 1 ]]; then
  w3() { local name=$1 limit=$2; shift 2; log "W3 $name: $*"
    timeout "$limit" "$PYTHON" -m sluice.entrypoints.cli bench throughput --model "$MODEL_DIR" --workload W3 \
      "${BASE[@]}" "${W3_POOL[@]}" "$@" --no-progress --output-json "$OUT/w3_$name.json" >"$OUT/w3_$name.log" 2>&1 \
      || log "W3 $name exited with $?"; tail -3 "$OUT/w3_$name.log"; }
fi

if wanted w8; then
  w8 gpu-only
  w8 host-tier --kv-offload-space "$OFFLOAD_GIB"
fi
if wanted w3; then
  w3 recompute 120 --num-prompts "$W3_N" --length-scale "$SCALE" --preemption-mode recompute
  w3 auto 120 --num-prompts "$W3_N" --length-scale "$SCALE" --preemption-mode auto --swap-space "$SWAP_GIB"
fi
if wanted w3-8k; then
  w3 8k-recompute 100 --num-prompts "$W3_8K_N" --length-scale "$SCALE_8K" --preemption-mode recompute
  w3 8k-auto 100 --num-prompts "$W3_8K_N" --length-scale "$SCALE_8K" --preemption-mode auto \
    --swap-space "$SWAP_GIB"
fi

"$PYTHON" - "$OUT" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
summary = {}
off, on = load("w8_gpu-only.json"), load("w8_host-tier.json")
if off and on:
    off, on = off["engine"], on["engine"]
    a, b = off["later_turns"]["ttft_ms_p50"], on["later_turns"]["ttft_ms_p50"]
    summary["w8_later_turn_ttft_p50_ms"] = {"gpu_only": a, "host_tier": b, "speedup": a / b if b else None}
    summary["w8_prefix_cache"] = {"gpu_only": off["prefix_cache"], "host_tier": on["prefix_cache"]}
for tag in ("", "8k-"):
    r, s = load(f"w3_{tag}recompute.json"), load(f"w3_{tag}auto.json")
    if r and s:
        x, y = r["engine"]["output_tokens_per_s"], s["engine"]["output_tokens_per_s"]
        summary[f"w3_{tag or 'base-'}auto_over_recompute"] = {"recompute": x, "auto": y, "ratio": y / x}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print(json.dumps(summary, indent=2))
EOF
log "done"
