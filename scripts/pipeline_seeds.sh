#!/usr/bin/env bash
# README command 1 on several seeds, each champion scored afterwards on 1000 validation
# questions by object count: how README "Start here" and docs/experiments.md measure the
# main job's spread. Usage (in an installed checkout): scripts/pipeline_seeds.sh 0 1 2
# Each run writes runs/s<S>/ (its pipeline.json names the champion); wall times and scores
# go to runs/pipeline-seeds.tsv.
set -euo pipefail
. "$(dirname "$0")/seed_run.sh"
export HF_HUB_OFFLINE=1
config=${CONFIG:-jobs/configs/default.yaml}
table=runs/pipeline-seeds.tsv
mkdir -p runs
for seed in "$@"; do
  run=runs/s$seed
  run_seed "$config" "$run" "$seed"
  raybench eval --config "$config" --set train.eval_samples=1000 --set run_dir="$run" \
    --model "$run/trials/$CHAMPION/model" --by-objects > "$run.eval.json"
  python3 - "$seed" "$WALL" "$CHAMPION" "$run.eval.json" "$(git rev-parse --short HEAD)" >> "$table" <<'PY'
import json, sys
seed, wall, champion, path, commit = sys.argv[1:]
text = open(path).read()
report = json.loads(text[text.index("{"):])  # the by-objects report goes to stderr
four = {q: report["scenes"]["qtypes"][q]["accuracy_by_objects"].get("4") for q in ("shape", "position")}
types = " ".join(f"{k[4:]}={v:.3f}" for k, v in sorted(report.items()) if k.startswith("acc/"))
print(f"seed={seed}\tcommit={commit}\twall_s={wall}\tchampion={champion}\taccuracy={report['accuracy']:.3f}\t"
      f"{types}\tshape_4obj={four['shape']:.3f}\tposition_4obj={four['position']:.3f}")
PY
  tail -1 "$table"
done
