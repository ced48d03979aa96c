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
# Other arms (ARMS="name:trainer flags;..."; HALF in them is half of the run's --steps), another preset
# (PRESET=wide28: 28 blocks of width 384, patch 2) and another name (NAME: the state folder and the tarball):
# analyses/gpu_successors.sh is this script with REPA's successors as its arms.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-.}
NAME=${NAME:-gpu_seeds}
ARMS=${ARMS:-"vanilla:--repa-coeff 0;repa:--repa-coeff 0.5"}
STATE=${STATE:-/tmp/$NAME}
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-$STATE/data/cifar10}
PY=${PYTHON:-python}
start=$(date +%s)
mkdir -p "$STATE/runs" "$STATE/at_step" "$OUT"

if [[ ${TINY:-0} == 1 ]]; then   # every step, at a scale a CPU runs in a minute
    SEEDS=${SEEDS:-2}; N=${N:-60}; TRAIN_S=${TRAIN_S:-120}; CKPT_EVERY=3; REPA_DEPTH=1; T=0,0.5; STEPS=6
    SIT=(--model SiT-S/4 --depth 3 --width 32 --heads 2 --batch 16 --projector-dim 32 --workers 0)
elif [[ ${PRESET:-deep} == wide28 ]]; then   # 28 blocks of width 384 (unmeasured: no GPU session yet)
    SEEDS=${SEEDS:-1}; N=${N:-10000}; TRAIN_S=${TRAIN_S:-300}; CKPT_EVERY=250; REPA_DEPTH=8; T=0,0.25,0.5; STEPS=4000
    SIT=(--model SiT-S/2 --depth 28 --width 384 --heads 6 --batch 256 --projector-dim 2048 --lr 2e-4
         --ema-decay 0.9995 --workers 2 --precision bf16)
else                             # sized for one H200: the deep preset (unmeasured: no GPU session yet)
    SEEDS=${SEEDS:-5}; N=${N:-10000}; TRAIN_S=${TRAIN_S:-300}; CKPT_EVERY=250; REPA_DEPTH=8; T=0,0.1,0.25,0.5,0.75
    STEPS=5000
    SIT=(--model SiT-S/4 --depth 28 --width 64 --heads 2 --batch 64 --projector-dim 128 --lr 3e-4
         --ema-decay 0.999 --workers 1 --precision bf16)
fi
IFS=';' read -ra ARM_SPECS <<< "$ARMS"

# 0. data
if [[ ! -d $DATA/train ]]; then
    $PY analyses/pack_data.py unpack gpu_pack/cifar10.npz "$DATA"
fi

# 1. all runs at once, each stopped after TRAIN_S seconds (a stopped run keeps its last checkpoint)
pids=()
for seed in $(seq 0 $((SEEDS - 1))); do
    for spec in "${ARM_SPECS[@]}"; do
        arm=${spec%%:*}; flags=${spec#*:}; flags=${flags//HALF/$((STEPS / 2))}
        timeout --signal=INT --kill-after=20 "$TRAIN_S" $PY -m repa_probe train --data "$DATA/train" \
            --image-size 32 "${SIT[@]}" --steps "$STEPS" --encoder cifar-ssl-resnet --repa-depth "$REPA_DEPTH" \
            $flags --ckpt-every "$CKPT_EVERY" --log-every 50 --seed "$seed" --device "$DEVICE" \
            --out "$STATE/runs/$arm-s$seed" --quiet > "$STATE/runs/$arm-s$seed.log" 2>&1 &
        pids+=($!)
    done
done
for pid in "${pids[@]}"; do wait "$pid" || true; done   # a run cut by the timeout exits non-zero
echo "trained ${#pids[@]} runs in $(( $(date +%s) - start )) s"

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
for spec in "${ARM_SPECS[@]}"; do      # the first arm first: compare's deltas are against its first checkpoint
    arm=${spec%%:*}
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
bash analyses/$NAME.sh   # ${SIT[*]} --steps $STEPS; ARMS=$ARMS
EOF
tar -czf "$OUT/$NAME.tar.gz" -C "$STATE" report weights $(cd "$STATE" && ls runs/*.log runs/*/log.jsonl)
echo "done: $OUT/$NAME.tar.gz ($(( $(date +%s) - start )) s)"
