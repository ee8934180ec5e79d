#!/bin/bash
# A/B alternated on the tiny model: before = an export of commit 00176c2 in /tmp/cpu_before (git archive 00176c2 | tar -x -C /tmp/cpu_before),
# after = this tree; each run is bench_sluice.py with its defaults (256 prompts x 128 in / 128 out, greedy); a run over 300 s is cut.
AFTER=${AFTER:-$(cd "$(dirname "$0")/.." && pwd)}
run() { (cd $1 && PYTHONPATH=$1 timeout 300 python /work/shared/vllm-cpu-peer/bench_sluice.py --model /tmp/cpu_tiny --dtype $2 2>&1 | grep RESULT | sed "s|^|$1 $2 load=$(cut -d' ' -f1 /proc/loadavg) |"); }
run $AFTER bfloat16
run /tmp/cpu_before bfloat16
run $AFTER float32
run /tmp/cpu_before float32
run $AFTER bfloat16
run $AFTER float32
