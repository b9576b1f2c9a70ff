#!/usr/bin/env bash
# One trial of the recipe search (docs/recipe_search.md): train, export, and score held-out code and English
# prose perplexity (32 blocks x 512 tokens each, bootstrap 95% intervals) with realised CR.
#   bench/recipe_trial.sh NAME CONFIG [dmc train overrides...]
# Writes checkpoints/search/NAME (the run), NAME-hf (the export) and eval/results/search/NAME (the scores, and
# paired.json: the ratios to the comparison's control and vanilla model on the same blocks, bench/trial_paired.py).
# Resumable: each stage is skipped when its output exists.
set -euo pipefail
name=$1 config=$2
shift 2
py=${PY:-.venv/bin/python}
run=checkpoints/search/$name
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=offline
mkdir -p "eval/results/search/$name"
if ! test -e "$run/summary.json"; then  # the training time is recorded only by the call that trains
    start=$(date +%s)
    $py -m dmc.cli train --config "$config" --run.out_dir "$run" --run.progress_bar false "$@"
    echo "{\"trial\": \"$name\", \"train_seconds\": $(( $(date +%s) - start )), \"overrides\": \"$*\"}" \
        > "eval/results/search/$name/trial.json"
fi
test -e "$run-hf/config.json" || $py -m dmc.cli export "$run" --out "$run-hf" --dtype float32 --overwrite
$py -m dmc.cli eval "$run-hf" --tasks ppl ppl_prose --ppl-blocks 32 --ppl-block 512 --batch-size 4 --threads 2 \
    --out "eval/results/search/$name" > /dev/null
$py - "$name" <<'PY'
import json, sys
name = sys.argv[1]
res = json.load(open(f"eval/results/search/{name}/results.json"))
(model,) = res["models"].values()
t = model["tasks"]
print(json.dumps({"trial": name, **json.load(open(f"eval/results/search/{name}/trial.json")),
                  "cr": round(t["ppl"]["realised_cr"], 3), "ppl_code": round(t["ppl"]["perplexity"], 3),
                  "ppl_code_ci95": [round(x, 3) for x in t["ppl"]["perplexity_ci95"]],
                  "ppl_prose": round(t["ppl_prose"]["perplexity"], 3),
                  "ppl_prose_ci95": [round(x, 3) for x in t["ppl_prose"]["perplexity_ci95"]]}))
PY
# the paired ratios against the comparison's control and vanilla model on the same blocks (eval/results/compare-135m)
$py bench/trial_paired.py "$name"
