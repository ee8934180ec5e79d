# Sourced by the device scripts (serve_h100.sh, lora_h100.sh, kv_tiers_h100.sh, spec_h100.sh): the results folder,
# the repository root as working directory, the commit the results record, and the helpers every stage uses.
#   OUT (required)   the folder that receives the results
#   PYTHON           the interpreter (default python)
#   SLUICE_COMMIT    recorded in the results (default: this checkout's HEAD; a device copy may have no .git)
# After sourcing, a script sets its own STAGES (and BUDGET_S where it uses stage_limit).
set -uo pipefail
: "${OUT:?set OUT to the folder that receives the results}"
mkdir -p "$OUT"
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python}
START=$(date +%s)
export SLUICE_COMMIT=${SLUICE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
log() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - START ))s] $*"; }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }  # whether stage $1 is in $STAGES
stage_limit() {  # seconds a stage wanting $1 may take, leaving $2 for the stages after it (0: no time left)
  local left=$(( BUDGET_S - ($(date +%s) - START) - $2 ))
  if (( left < 15 )); then echo 0; elif (( left < $1 )); then echo "$left"; else echo "$1"; fi
}
