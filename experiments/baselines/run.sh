#!/usr/bin/env bash
# The dense baselines of experiments/baselines/README.md: 3 seeds each, one thread per run (OMP_NUM_THREADS=1).
#   bash experiments/baselines/run.sh digits   # ~1-3 min a run
#   bash experiments/baselines/run.sh elpv     # ~5-10 min a run
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
py=.venv/bin/python
common=(trainer.enable_progress_bar=false logger=csv)
case "${1:-elpv}" in
digits)
  for seed in 1 2 3; do
    $py train.py data=digits backbone=vit_edge seed=$seed task_name=baselines_digits "${common[@]}"
    $py train.py data=digits backbone=vit_hybrid seed=$seed task_name=baselines_digits "${common[@]}"
    $py train.py data=digits data.image_size=16 backbone=vit_hybrid seed=$seed task_name=baselines_digits "${common[@]}"
    $py train.py data=digits backbone=resnet18 seed=$seed task_name=baselines_digits "${common[@]}"
  done ;;
elpv)
  for seed in 1 2 3; do
    # the teacher first: a ResNet-18 at 96 px, 10 epochs
    $py train.py data=surface_defect data.image_size=96 backbone=resnet18 trainer.max_epochs=10 seed=$seed \
      task_name=baselines_elpv_teacher "${common[@]}"
    teacher=$(ls -d logs/baselines_elpv_teacher/runs/* | tail -n 1)
    $py train.py data=surface_defect backbone=vit_hybrid seed=$seed task_name=baselines_elpv "${common[@]}"
    $py train.py data=surface_defect backbone=vit_hybrid backbone.distilled=true model.teacher="$teacher" seed=$seed \
      task_name=baselines_elpv "${common[@]}"
    $py train.py data=surface_defect backbone=vit_edge seed=$seed task_name=baselines_elpv "${common[@]}"
  done ;;
esac
