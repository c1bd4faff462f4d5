#!/bin/bash
# Interrupt a GPTQ run of the real model halfway (SIGINT, as Ctrl-C), resume it, and compare the file with
# an uninterrupted run of the same command (benchmarks/quality.py's qcompile-gptq-Q4_K_M, or pass its path).
# Usage: benchmarks/resume_demo.sh [CLEAN.gguf]
set -u
Q=$HOME/.cache/qcompile-bench/quality
M=${QCOMPILE_REAL_MODEL:-$HOME/.cache/qcompile-test-assets/Qwen2.5-Coder-0.5B-Instruct}
CLEAN=${1:-$Q/qcompile-gptq-Q4_K_M/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf}
OUT=$(mktemp -d)
ARGS=("$M" --to gguf --quant Q4_K_M --method gptq --calib "$Q/calib.txt" --calib-samples 128 --calib-seqlen 512
      --out "$OUT" -q --no-verify)
START=$(date +%s)
# a shell's background jobs start with SIGINT ignored; give the child the default disposition back
python -c "import signal,os,sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execvp(sys.argv[1], sys.argv[1:])" \
    qcompile "${ARGS[@]}" &
PID=$!
STATE=$OUT/.Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.resume/state.json
until [ -f "$STATE" ] && [ "$(python -c "import json;print(json.load(open('$STATE'))['layer'])")" -ge 11 ]; do sleep 2; done
kill -INT $PID; wait $PID; echo "interrupted run: exit $? after $(( $(date +%s) - START )) s (12 of 24 layers done)"
/usr/bin/time -f "resumed run: %e s, peak RSS %M KB" qcompile "${ARGS[@]}" --resume
sha256sum "$OUT"/*.gguf "$CLEAN"
cmp "$OUT"/*.gguf "$CLEAN" && echo IDENTICAL
