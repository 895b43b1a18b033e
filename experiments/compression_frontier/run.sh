#!/usr/bin/env bash
# experiments/compression_frontier/README.md: ResNet-18 on elpv from the same trained dense checkpoint per seed
# (the dense runs of experiments/accelerating_lrd: python train.py -m experiment=elpv_resnet18 seed=1,2,3
#  trainer.max_epochs=10 task_name=accel_dense), one thread per run.
#   bash experiments/compression_frontier/run.sh a <dense multirun dir>   # (a) no fine-tuning, 4 weightings x 3 ratios
#   bash experiments/compression_frontier/run.sh b <dense multirun dir>   # (b) the same 2-epoch fine-tuning budget
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
part=${1:?a or b} dense_dir=${2:?the dense multirun dir (job folders 0, 1, 2 = seeds 1, 2, 3)}
py=.venv/bin/python
for job in ${JOBS:-0 1 2}; do
  seed=$((job + 1))
  ckpt=$($py -c "import json,sys; print(json.load(open(sys.argv[1]))['extra']['tested_checkpoint'])" \
    "$dense_dir/$job/summary.json")
  run=($py train.py experiment=compression_frontier seed=$seed decomp.ckpt_path="$ckpt")
  if [ "$part" = a ]; then
    $py train.py -m experiment=compression_frontier seed=$seed decomp.ckpt_path="$ckpt" task_name=frontier_a decomp.finetune_epochs=0 decomp.ratio=${RATIOS:-0.5,0.3,0.2} \
      decomp.weighting=none,activation,asvd,fisher
  else
    "${run[@]}" task_name=frontier_b                                              # one-shot LRD, 2 epochs
    "${run[@]}" task_name=frontier_b decomp.weighting=activation                  # data-aware one-shot, 2 epochs
    "${run[@]}" task_name=frontier_b decomp.schedule=multistage decomp.stages=1 \
      decomp.distill_weight=0.5                                                   # one-shot + distillation
    "${run[@]}" task_name=frontier_b decomp.schedule=multistage decomp.stages=2 \
      decomp.stage_ratios=[0.7,0.5] decomp.finetune_epochs=1                      # MUSCO, ratio schedule, 2 x 1
    "${run[@]}" task_name=frontier_b decomp.schedule=multistage decomp.stages=2 decomp.rank_selector=evbmf \
      decomp.ratio=null decomp.default_ratio=null decomp.finetune_epochs=1        # MUSCO, EVBMF ranks, 2 x 1
    "${run[@]}" task_name=frontier_b decomp=svd_train decomp.ratio=null decomp.prune_ratio=0.5 \
      decomp.train_epochs=1 decomp.finetune_epochs=1                              # SVD training, 1 + 1
  fi
done
