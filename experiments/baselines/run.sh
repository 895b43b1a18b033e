#!/usr/bin/env bash
# The dense baselines of experiments/baselines/README.md: 3 seeds each, one thread per run (OMP_NUM_THREADS=1).
#   bash experiments/baselines/run.sh digits   # ~1-3 min a run (DeiT-style: the resnet18 run of its seed teaches)
#   bash experiments/baselines/run.sh elpv     # ~5-10 min a run
#   bash experiments/baselines/run.sh recipe   # vit_hybrid on elpv, one recipe key changed at a time, ~4-10 min a run
#   bash experiments/baselines/run.sh folder   # vit_hybrid on elpv written as class folders (elpv_as_folders.py)
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
    teacher=$(ls -d logs/baselines_digits/runs/* | tail -n 1)  # the resnet18 run just made
    $py train.py data=digits backbone=vit_hybrid backbone.distilled=true model.teacher="$teacher" seed=$seed \
      task_name=baselines_digits "${common[@]}"
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
recipe)
  for change in data.augment=strong model.label_smoothing=0.1 model.ema_decay=0.999 \
      "model.mixup_alpha=0.8 model.cutmix_alpha=1.0" data.image_size=96 trainer.max_epochs=60 \
      "data.image_size=96 model.label_smoothing=0.1"; do  # the last: the two best means together
    for seed in 1 2 3; do
      # shellcheck disable=SC2086  # $change holds one or two overrides
      $py train.py data=surface_defect backbone=vit_hybrid $change seed=$seed task_name=baselines_elpv_recipe \
        "${common[@]}"
    done
  done
  # exploring beyond 10 minutes: a ResNet-18 at 128 px for 20 epochs (one seed)
  $py train.py data=surface_defect backbone=resnet18 data.image_size=128 trainer.max_epochs=20 seed=1 \
    task_name=baselines_elpv_long "${common[@]}" ;;
folder)
  root=${ROOT:-/tmp/elpv_folders}
  [ -d "$root" ] || $py experiments/baselines/elpv_as_folders.py "$root"
  for seed in 1 2 3; do
    $py train.py data=surface_defect data.source=folder data.root="$root" "data.good_classes=[p0,p33]" \
      backbone=vit_hybrid seed=$seed task_name=baselines_folder "${common[@]}"
  done ;;
*) echo "usage: $0 digits|elpv|recipe|folder" >&2; exit 2 ;;
esac
