#!/usr/bin/env bash
# The finding across training seeds, in ONE device call (TRAIN_S of training, then the analysis; issue 25 §3):
#   1. SEEDS training seeds × 2 arms (vanilla, REPA λ = 0.5 at block 8 against the bundled CIFAR-10 teacher) of
#      the deep CIFAR-10 preset (28 blocks, width 64, patch 4; analyses/cifar_runs.py), all trained at once on one
#      GPU, one process each; within a seed the arms share init, data order, t and noise, across seeds they differ;
#   2. every run stopped at TRAIN_S seconds (or at its last step), checkpoints every CKPT_EVERY steps; the
#      analysis takes the last step that every run reached, so all seeds are compared at the same training step;
#   3. `repa-probe compare` of all 2 × SEEDS checkpoints, named ARM-sSEED (the report's seed-level statistics
#      group them: docs/statistics.md) on N cifar10/test images, probes fitted on N train images, 5 t;
#   4. the report, the runs' logs and the checkpoints' fp16 EMA weights packed into $OUT/gpu_seeds.tar.gz.
#
# Here, once (the data does not travel with the code):
#   python analyses/pack_data.py pack ../shared/data/cifar10 gpu_pack/cifar10.npz          # ~54 MB
# On the device (carry gpu_pack):
#   bash analyses/gpu_seeds.sh
# The same steps at toy scale on a CPU (tests/test_gpu_seeds.py runs this):
#   TINY=1 DEVICE=cpu DATA=../shared/data/cifar10 bash analyses/gpu_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-.}
STATE=${STATE:-/tmp/gpu_seeds}
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-$STATE/data/cifar10}
PY=${PYTHON:-python}
start=$(date +%s)
mkdir -p "$STATE/runs" "$STATE/at_step" "$OUT"

if [[ ${TINY:-0} == 1 ]]; then   # every step, at a scale a CPU runs in a minute
    SEEDS=${SEEDS:-2}; N=${N:-60}; TRAIN_S=${TRAIN_S:-120}; CKPT_EVERY=3; REPA_DEPTH=1; T=0,0.5
    SIT=(--model SiT-S/4 --depth 3 --width 32 --heads 2 --batch 16 --steps 6 --projector-dim 32 --workers 0)
else                             # sized for one H200: the deep preset (unmeasured: no GPU session yet)
    SEEDS=${SEEDS:-5}; N=${N:-10000}; TRAIN_S=${TRAIN_S:-300}; CKPT_EVERY=250; REPA_DEPTH=8; T=0,0.1,0.25,0.5,0.75
    SIT=(--model SiT-S/4 --depth 28 --width 64 --heads 2 --batch 64 --steps 5000 --projector-dim 128 --lr 3e-4
         --ema-decay 0.999 --workers 1 --precision bf16)
fi

# 0. data
if [[ ! -d $DATA/train ]]; then
    $PY analyses/pack_data.py unpack gpu_pack/cifar10.npz "$DATA"
fi

# 1. all runs at once, each stopped after TRAIN_S seconds (a stopped run keeps its last checkpoint)
pids=()
for seed in $(seq 0 $((SEEDS - 1))); do
    for arm in "vanilla 0" "repa 0.5"; do
        set -- $arm
        timeout --signal=INT --kill-after=20 "$TRAIN_S" $PY -m repa_probe train --data "$DATA/train" \
            --image-size 32 "${SIT[@]}" --encoder cifar-ssl-resnet --repa-depth "$REPA_DEPTH" --repa-coeff "$2" \
            --ckpt-every "$CKPT_EVERY" --log-every 50 --seed "$seed" --device "$DEVICE" \
            --out "$STATE/runs/$1-s$seed" --quiet > "$STATE/runs/$1-s$seed.log" 2>&1 &
        pids+=($!)
    done
done
for pid in "${pids[@]}"; do wait "$pid" || true; done   # a run cut by the timeout exits non-zero
echo "trained $((2 * SEEDS)) runs in $(( $(date +%s) - start )) s"

# 2. the last step every run reached; each run's checkpoint of that step, named ARM-sSEED
step=$($PY - "$STATE/runs" <<'EOF'
import sys
from pathlib import Path
steps = [max((int(p.stem) for p in run.glob("checkpoints/*.pt")), default=0) for run in Path(sys.argv[1]).iterdir()
         if run.is_dir()]
print(min(steps))
EOF
)
if (( step == 0 )); then echo "no run reached its first checkpoint: see $STATE/runs/*.log"; exit 1; fi
ckpts=()
for arm in vanilla repa; do           # vanilla first: compare's deltas are against its first checkpoint
    for seed in $(seq 0 $((SEEDS - 1))); do
        ln -sfn "$STATE/runs/$arm-s$seed/checkpoints/$(printf %07d "$step").pt" "$STATE/at_step/$arm-s$seed.pt"
        ckpts+=("$STATE/at_step/$arm-s$seed.pt")
    done
done
echo "analysing ${#ckpts[@]} checkpoints at step $step"

# 3. the seed report
$PY -m repa_probe compare "${ckpts[@]}" --data "$DATA/test" --n "$N" --probe-train "$DATA/train" \
    --probe-n-train "$N" --probe-test "$DATA/test" --probe-n-test "$N" --encoder cifar-ssl-resnet --t "$T" \
    --device "$DEVICE" --workers 4 --cache "$STATE/cache" --quiet --out "$STATE/report"

# 4. one file back: the report, the logs, the command, and the EMA weights that re-make it
$PY analyses/export_weights.py "$STATE/weights" "${ckpts[@]}"
cat > "$STATE/report/COMMAND.txt" <<EOF
$(git rev-parse HEAD 2>/dev/null || echo "(no git)") SEEDS=$SEEDS N=$N TRAIN_S=$TRAIN_S step=$step
bash analyses/gpu_seeds.sh   # ${SIT[*]}
EOF
tar -czf "$OUT/gpu_seeds.tar.gz" -C "$STATE" report weights $(cd "$STATE" && ls runs/*.log runs/*/log.jsonl)
echo "done: $OUT/gpu_seeds.tar.gz ($(( $(date +%s) - start )) s)"
