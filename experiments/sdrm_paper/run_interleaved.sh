#!/usr/bin/env bash
# NRR and SDRM (the paper's pipeline) re-run so that their whole fits share the machine's load: two streams, one
# thread each; at every moment one NRR fit and one SDRM fit run side by side (stream 1: NRR 1, SDRM 2, NRR 3;
# stream 2: SDRM 1, NRR 2, SDRM 3).
#   bash experiments/sdrm_paper/run_interleaved.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 WANDB_MODE=offline
run() { .venv/bin/python train.py experiment=sdrm_paper task_name=sdrm_paper_interleaved logger=csv "$@"; }
( run sdrm_variant=nrr seed=1; run sdrm_variant=sdrm seed=2; run sdrm_variant=nrr seed=3 ) > /tmp/interleaved_1.log 2>&1 &
( run sdrm_variant=sdrm seed=1; run sdrm_variant=nrr seed=2; run sdrm_variant=sdrm seed=3 ) > /tmp/interleaved_2.log 2>&1 &
wait
