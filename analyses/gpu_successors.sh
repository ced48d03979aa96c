#!/usr/bin/env bash
# REPA's successors in ONE device call (issue 29 §6): vanilla, REPA (λ 0.5 at block 8), REPA switched off at half
# the steps (HASTE's --align-until), SRA (--self-align 0.5), Dispersive Loss (--dispersive 0.25) and REG
# (--reg-cls 0.03 beside REPA; the CIFAR teacher's pooled feature as its class token) on one
# training seed of the width-384 28-block preset (patch 2, 256 tokens), all trained at once on one GPU for
# TRAIN_S seconds, compared at the step all reached on N cifar10/test images with paired intervals, and packed
# into $OUT/gpu_successors.tar.gz. It is analyses/gpu_seeds.sh with these arms (see there for the steps and the
# data pack to carry). At toy scale on a CPU (tests/test_gpu_seeds.py):
#   TINY=1 DEVICE=cpu DATA=../shared/data/cifar10 bash analyses/gpu_successors.sh
export NAME=gpu_successors PRESET=${PRESET:-wide28}
export ARMS="vanilla:--repa-coeff 0;repa:--repa-coeff 0.5;repa-stop:--repa-coeff 0.5 --align-until HALF;\
sra:--repa-coeff 0 --self-align 0.5;dispersive:--repa-coeff 0 --dispersive 0.25;reg:--repa-coeff 0.5 --reg-cls 0.03"
exec bash "$(dirname "$0")/gpu_seeds.sh"
