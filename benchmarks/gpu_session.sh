#!/usr/bin/env bash
# The GPU benchmarks of one device session, in priority order, each under its own time limit
# (the last one gets what is left of BUDGET seconds); every output lands in $OUT.
#
# Here (the data does not travel with the code; 18 MB: CIFAR-10 test + the first 1,000 train
# images of each class, what bench_probe and bench_analyze read):
#   python analyses/pack_data.py pack <that subset of ../shared/data/cifar10> gpu_pack/cifar10_bench.npz
# On the device (nothing installs there; gpu_pack carried):
#   BUDGET=480 bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_out}
BUDGET=${BUDGET:-480}
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
step cknna 70 python benchmarks/bench_cknna.py --device cuda --sizes 1000,2000,4000,10000 --batched-n 10000
step probe 120 python benchmarks/bench_probe.py --device cuda --data "$DATA"
step train 90 python benchmarks/bench_train.py --models B/2,XL/2
left=$(( BUDGET - ($(date +%s) - t0) ))
step analyze $(( left > 30 ? left : 30 )) python benchmarks/bench_analyze.py --model SiT-XL/2 --n 10000 \
    --encoder dinov2-vit-l --device cuda --data "$DATA/test" --workers 8 --progress
tail -c 3000 "$OUT/analyze.err"
