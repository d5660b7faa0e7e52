#!/usr/bin/env bash
# README's digits example on several seeds: the real-image data written and imported once,
# then the pipeline per seed, its champion scored on every held-out digit, turn by turn
# (teacher-forced and as served). Usage (in an installed checkout): scripts/digits_seeds.sh 0 1
# Runs write runs/digits-s<S>/; wall times and scores go to runs/digits-seeds.tsv.
set -euo pipefail
. "$(dirname "$0")/seed_run.sh"
export HF_HUB_OFFLINE=1
config=jobs/configs/digits.yaml
table=runs/digits-seeds.tsv
mkdir -p runs
if [ ! -d runs/digits-data ]; then
  start=$(date +%s)
  python3 examples/digits/make_digits.py --out runs/digits-src
  raybench data import --format llava runs/digits-src/digits.json --out runs/digits-data --val-fraction 0.2
  echo "data: $(( $(date +%s) - start )) s"
fi
for seed in "$@"; do
  run=runs/digits-s$seed
  run_seed "$config" "$run" "$seed"
  raybench eval --config "$config" --set train.eval_samples=1000 --set run_dir="$run" \
    --model "$run/trials/$CHAMPION/model" > "$run.eval.json"
  python3 - "$seed" "$WALL" "$CHAMPION" "$run.eval.json" "$(git rev-parse --short HEAD)" >> "$table" <<'PY'
import json, sys
seed, wall, champion, path, commit = sys.argv[1:]
r = json.load(open(path))
print(f"seed={seed}\tcommit={commit}\twall_s={wall}\tchampion={champion}\tdigit={r['acc/turn1']:.3f}\t"
      f"followup={r['acc/followup']:.3f}\tserved_digit={r['served/turn1']:.3f}\t"
      f"served_followup={r['served/followup']:.3f}\tserved_conversation={r['served/conversation']:.3f}")
PY
  tail -1 "$table"
done
