#!/usr/bin/env bash
# The SDRM study's new variants (2026-12-01): SDRM with lrk's calibrated basis, SDRM with the paper's per-head
# input split, and DeiT-style with a real teacher (the ResNet-18 teachers of experiments/baselines, one per
# seed), 15 epochs, 3 seeds, one thread per run; FULL=1 also runs NRR and SDRM again, interleaved with them.
#   bash experiments/sdrm_paper/run_variants.sh            # SEEDS="2 3" for some seeds
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} WANDB_MODE=${WANDB_MODE:-offline}
py=.venv/bin/python
for seed in ${SEEDS:-1 2 3}; do
  run=($py train.py experiment=sdrm_paper seed=$seed task_name=sdrm_paper_v2 logger=csv)
  if [ -n "${FULL:-}" ]; then  # NRR and SDRM again (their 2026-11-23 runs are in the README)
    "${run[@]}" sdrm_variant=nrr
    "${run[@]}" sdrm_variant=sdrm
  fi
  "${run[@]}" sdrm_variant=sdrm decomp.subspace=calibrated
  "${run[@]}" sdrm_variant=sdrm decomp.head_split=input
  teacher=$($py - "$seed" <<'PY'
import json, pathlib, sys
runs = sorted(pathlib.Path("logs/baselines_elpv_teacher/runs").glob("*/summary.json"))
hits = [p.parent for p in runs if json.loads(p.read_text())["config"]["seed"] == int(sys.argv[1])]
print(hits[-1] if hits else "")
PY
)
  if [ -n "$teacher" ]; then
    "${run[@]}" sdrm_variant=deit model.teacher="$teacher"
  fi
done
