#!/usr/bin/env bash
# The real-scale version of the deep-SiT experiment (issue 13 §3), for one device session in chained calls:
#   1. a better CIFAR-10 SimCLR teacher (the bundled one's recipe and architecture, many more epochs), and its
#      linear-probe accuracy;
#   2. a 28-block, width-384 SiT/2 on CIFAR-10 pixels (16×16 = 256 tokens), vanilla and REPA (λ = 0.5 at block 8,
#      as REPA does for depth 28) against that teacher, identical but for the REPA term;
#   3. the compare report on 10,000 test images, probes fitted on 10,000 train images.
# Every stage resumes exactly where the previous call stopped (teacher epochs, SiT steps, the analysis's feature
# store); the state lives in STATE on the machine's disk. A call runs at most LIMIT seconds, then exits 0 saying
# "call again"; once everything is done it packs reports, logs and the teacher's numbers into
# $OUT/gpu_reproduce.tar.gz (one file: $OUT brings back at most 8).
#
# Here, once (the data does not travel with the code):
#   python analyses/pack_data.py pack ../shared/data/cifar10 gpu_pack/cifar10.npz          # ~54 MB
# On the device, in calls of ≤ 10 minutes (carry gpu_pack), until it prints "done":
#   LIMIT=540 bash analyses/gpu_reproduce.sh
# The same steps at toy scale on a CPU (run by hand; no test runs this script, unlike gpu_seeds.sh):
#   TINY=1 DEVICE=cpu DATA=../shared/data/cifar10 LIMIT=600 bash analyses/gpu_reproduce.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-.}
LIMIT=${LIMIT:-540}
STATE=${STATE:-/tmp/gpu_reproduce}
OUT=${OUT:-/tmp/out}
DEVICE=${DEVICE:-cuda}
DATA=${DATA:-$STATE/data/cifar10}
PY=${PYTHON:-python}
start=$(date +%s)
mkdir -p "$STATE" "$OUT"

if [[ ${TINY:-0} == 1 ]]; then   # every step, at a scale a CPU runs in a minute or two
    TEACHER=(--epochs 2 --limit-per-class 20 --batch-size 64)
    PROBE=(--limit-per-class 20)
    SIT=(--model SiT-S/4 --depth 3 --width 32 --heads 2 --batch 16 --steps 6 --ckpt-every 3 --projector-dim 32)
    N=60
else                             # sized for ~25 minutes of one H100/H200 (unmeasured: no GPU session yet)
    TEACHER=(--epochs ${TEACHER_EPOCHS:-60} --batch-size 512 --lr 0.6)
    SIT=(--model SiT-S/2 --depth 28 --width 384 --heads 6 --batch 256 --steps ${SIT_STEPS:-3000} --ckpt-every 250
         --projector-dim 2048 --lr 2e-4 --ema-decay 0.9995)
    PROBE=()
    N=10000
fi

left() { echo $(( LIMIT - ($(date +%s) - start) )); }
run_for() {  # command...: run it within what is left of LIMIT; exit 0 ("call again") if time runs out
    local budget
    budget=$(left)
    if (( budget < 20 )); then echo "time is up: call again"; exit 0; fi
    set +e
    timeout --signal=INT --kill-after=30 "$budget" "$@"
    local rc=$?
    set -e
    if (( rc == 124 || rc == 130 )); then echo "time is up in: $*; call again"; exit 0; fi
    return $rc
}

# 0. data
if [[ ! -d $DATA/train ]]; then
    run_for $PY analyses/pack_data.py unpack gpu_pack/cifar10.npz "$DATA"
fi

# 1. the teacher
if [[ ! -f $STATE/teacher/done ]]; then
    run_for $PY analyses/train_teacher.py --data "$DATA" --out "$STATE/teacher" --resume --device "$DEVICE" \
        --threads "$(nproc)" "${TEACHER[@]}"
    run_for $PY analyses/probe_teacher.py --ckpt "$STATE/teacher/last.pt" --data "$DATA" \
        --export "$STATE/teacher/teacher.safetensors" --json "$STATE/teacher/probe.json" --threads "$(nproc)" \
        "${PROBE[@]}"
    touch "$STATE/teacher/done"
fi
ENCODER=("cifar-ssl-resnet=$STATE/teacher/teacher.safetensors")

# 2. the two SiTs (train resumes from RUN/checkpoints by itself)
for spec in "vanilla 0" "repa 0.5"; do
    set -- $spec
    if [[ ! -f $STATE/runs/$1/done ]]; then
        run_for $PY -m repa_probe train --data "$DATA/train" --image-size 32 "${SIT[@]}" --encoder "${ENCODER[@]}" \
            --repa-depth "$([[ ${TINY:-0} == 1 ]] && echo 1 || echo 8)" --repa-coeff "$2" --log-every 50 \
            --workers 4 --seed 0 --device "$DEVICE" --out "$STATE/runs/$1" --quiet
        touch "$STATE/runs/$1/done"
    fi
done

# 3. the analysis (its feature store resumes a call that was cut short)
if [[ ! -f $STATE/reports/depth_gpu/report.pdf ]]; then
    run_for $PY -m repa_probe compare "$STATE/runs/vanilla" "$STATE/runs/repa" --data "$DATA/test" --n "$N" \
        --probe-train "$DATA/train" --probe-n-train "$N" --probe-test "$DATA/test" --probe-n-test "$N" \
        --encoder "${ENCODER[@]}" --bootstrap 20 --null 20 --samples 16 --device "$DEVICE" --workers 4 \
        --cache "$STATE/cache" --quiet --out "$STATE/reports/depth_gpu"
fi

# 4. one file back
tar -czf "$OUT/gpu_reproduce.tar.gz" -C "$STATE" reports teacher/probe.json teacher/done \
    runs/vanilla/log.jsonl runs/repa/log.jsonl
echo "done: $OUT/gpu_reproduce.tar.gz ($(( $(date +%s) - start )) s in this call)"
