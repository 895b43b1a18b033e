#!/usr/bin/env bash
# the longer budget: activation-weighted SVD + distillation from the dense model, 4 fine-tuning epochs
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 WANDB_MODE=offline
for job in 0 1 2; do
  seed=$((job + 1))
  ckpt=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['extra']['tested_checkpoint'])" logs/accel_dense/multiruns/2026-12-01_09-24-22_24903-2edf/$job/summary.json)
  for ratio in 0.5 0.3 0.2; do
    .venv/bin/python train.py experiment=compression_frontier seed=$seed decomp.ckpt_path="$ckpt" task_name=frontier_c \
      decomp.schedule=multistage decomp.stages=1 decomp.distill_weight=0.5 decomp.weighting=activation \
      decomp.ratio=$ratio decomp.finetune_epochs=4
  done
done
