# Sourced by pipeline_seeds.sh and digits_seeds.sh: one pipeline run per seed.
# run_seed CONFIG RUN SEED: `raybench pipeline` with the seed's sweep.seed and train.seed into
# RUN (its output in RUN.log); sets WALL (seconds) and CHAMPION (the champion's trial id).
run_seed() {
  local config=$1 run=$2 seed=$3 start
  start=$(date +%s)
  raybench pipeline --config "$config" --set sweep.seed="$seed" --set train.seed="$seed" \
    --set run_dir="$run" > "$run.log" 2>&1
  WALL=$(( $(date +%s) - start ))
  CHAMPION=$(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['champion'])" "$run/pipeline.json")
}
