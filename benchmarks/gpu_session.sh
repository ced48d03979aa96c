#!/usr/bin/env bash
# The GPU benchmarks of one device session, in priority order, each under its own time limit
# (the last one gets what is left of BUDGET seconds); every output lands in $OUT.
#
# Here (the data does not travel with the code; 18 MB: CIFAR-10 test + the first 1,000 train
# images of each class, what bench_probe and bench_analyze read; and a trained pixel checkpoint for
# bench_encoder_precision, e.g. the deep CIFAR REPA run's last one):
#   python analyses/pack_data.py pack <that subset of ../shared/data/cifar10> gpu_pack/cifar10_bench.npz
#   cp runs/cifar_deep/repa/checkpoints/<its last>.pt gpu_pack/cifar_repa.pt
# and REPA's own model and loss for bench_train --official (the `fetch` tool's snapshot of sihyun-yu/REPA):
#   mkdir -p gpu_pack/REPA && git -C <snapshot>.git archive HEAD models/sit.py loss.py | tar -x -C gpu_pack/REPA
# On the device (nothing installs there; gpu_pack carried):
#   BUDGET=540 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-540}
DATA=/tmp/data/cifar10
export PYTHONPATH=.
mkdir -p "$OUT"
t0=$(date +%s)
python analyses/pack_data.py unpack gpu_pack/cifar10_bench.npz "$DATA" > /dev/null
{ nvidia-smi; python -c "import torch, timm, sklearn; print(torch.__version__, timm.__version__, sklearn.__version__)"; nproc; } \
    > "$OUT/device.txt" 2>&1

step() {  # name limit_s command...
    local name=$1 limit=$2 start=$(date +%s)
    shift 2
    echo "== $name (limit $limit s): $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" >> "$OUT/$name.txt" 2> "$OUT/$name.err"
    echo "rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/$name.txt"
    grep -v '%|' "$OUT/$name.txt" | tail -n 25
}
# 1. capture end to end (data loading, prefetch, async copies, background store writes) vs bare forwards
step capture 90 python benchmarks/bench_capture.py --device cuda --precision bf16 --model SiT-XL/2 --batch-size 256 \
    --n 4096 --ts 0.25,0.5 --workers 8 --repeats 3 --data "$DATA/test"
# 2. encoder bf16 autocast: feature and CKNNA deviation against fp32, bootstrap width, encode time
step encoder_precision 50 python benchmarks/bench_encoder_precision.py --checkpoint gpu_pack/cifar_repa.pt \
    --device cuda --n 10000 --data "$DATA/test"
step encoder_precision_vitl 50 python benchmarks/bench_encoder_precision.py --checkpoint gpu_pack/cifar_repa.pt \
    --encoder dinov2-vit-l --random-init --device cuda --n 10000 --data "$DATA/test"
# 3. the training step: ours eager and under torch.compile against REPA's official model + loss, with MFU;
#    then capture under torch.compile
step train 170 python benchmarks/bench_train.py --models B/2,XL/2 --compile --official gpu_pack/REPA
step curve 60 python benchmarks/bench_train.py --models B/2 --batch 32 --curve 100
step capture_compile 80 python benchmarks/bench_capture.py --device cuda --precision bf16 --model SiT-XL/2 \
    --batch-size 256 --n 2048 --ts 0.25,0.5 --workers 8 --repeats 3 --compile --data "$DATA/test"
# 4. sample quality's sampler (issue 27, item 7): SiT-XL/2, bf16, eager then compiled; 50k × 250 SDE steps estimated
step generation 40 python benchmarks/bench_generation.py --model SiT-XL/2 --device cuda --precision bf16 --n 256 \
    --batch-size 256 --steps 10 --repeats 2 --no-single --no-fd
step generation_compile 60 python benchmarks/bench_generation.py --model SiT-XL/2 --device cuda --precision bf16 \
    --compile --n 256 --batch-size 256 --steps 10 --repeats 2 --no-single --no-fd
# 5. analyze end to end with what is left (189.5 s before: it needs a second call when under ~200 s are left)
left=$(( BUDGET - ($(date +%s) - t0) ))
step analyze $(( left > 30 ? left : 30 )) python benchmarks/bench_analyze.py --model SiT-XL/2 --n 10000 \
    --encoder dinov2-vit-l --device cuda --data "$DATA/test" --workers 8 --progress
tail -c 3000 "$OUT/analyze.err"
# measured in the 2026-11-26 session (benchmarks/results/2026-11-26-h200); rerun only with EXTRA=1
if [ "${EXTRA:-0}" = 1 ]; then
    step cknna 70 python benchmarks/bench_cknna.py --device cuda --sizes 1000,2000,4000,10000 --batched-n 10000
    step probe 120 python benchmarks/bench_probe.py --device cuda --data "$DATA"
    step store_checksum 330 python benchmarks/bench_store_checksum.py --n 10000 --blocks 28 --dim 1152 \
        --model SiT-XL/2 --analyze-n 10000 --analyze-t 0 0.1 0.25 0.5 0.75 --encoder dinov2-vit-l --device cuda \
        --workers 8 --data "$DATA/test"
fi
