#!/usr/bin/env bash
# SiT-XL/2 (vanilla, 7M steps) vs REPA SiT-XL/2 (4M steps) against DINOv2-g and DINOv2-B on ImageNet,
# with the official checkpoints and encoder weights. See full_scale.md for where to get each file and what
# the paper leads us to expect. Needs a GPU (or 8: see the torchrun line) and about 20 GB of disk.
#
#   IMAGENET=/data/imagenet WEIGHTS=/data/weights bash analyses/full_scale.sh
set -euo pipefail
: "${IMAGENET:?set IMAGENET to the folder holding ImageNet train/ and val/ (ImageFolder layout)}"
: "${WEIGHTS:?set WEIGHTS to the folder holding the files listed in full_scale.md}"
OUT=${OUT:-reports/full_scale}
N=${N:-10000}
COMMON=(--data "$IMAGENET/val" --n "$N" --probe-train "$IMAGENET/train" --probe-test "$IMAGENET/val"
        --probe-n-train "$N" --probe-n-test "$N" --vae "$WEIGHTS/sd-vae-ft-mse" --bootstrap 50
        --encoder "dinov2-vit-g=$WEIGHTS/dinov2_vitg14_pretrain.pth" --encoder "dinov2-vit-b=$WEIGHTS/dinov2_vitb14_pretrain.pth")

repa-probe inspect "$WEIGHTS/SiT-XL-2-256x256.pt"      # convention "sit" from the released file name
repa-probe inspect "$WEIGHTS/last.pt"                  # REPA's released SiT-XL/2, convention "repa"

# 1. the layer-wise peak of the vanilla SiT-XL/2 (REPA Fig. 2–3)
repa-probe analyze "$WEIGHTS/SiT-XL-2-256x256.pt" "${COMMON[@]}" --out "$OUT/sit_xl2"
# 2. REPA vs vanilla at every block × t (same images, same noise)
repa-probe compare "$WEIGHTS/SiT-XL-2-256x256.pt" "$WEIGHTS/last.pt" "${COMMON[@]}" --samples 16 --out "$OUT/repa_vs_sit"
# 3. DiT-XL/2 for reference (discrete VP time: every t is mapped to the DiT step of equal SNR)
repa-probe analyze "$WEIGHTS/DiT-XL-2-256x256.pt" "${COMMON[@]}" --out "$OUT/dit_xl2"

# On an 8-GPU box, fill the feature store in an eighth of the time first; analyze then only reads it:
#   torchrun --nproc_per_node=8 -m repa_probe extract "$WEIGHTS/SiT-XL-2-256x256.pt" --data "$IMAGENET/val" \
#       --num-images "$N" --vae "$WEIGHTS/sd-vae-ft-mse" --precision bf16
