#!/bin/bash
# Task batches with the tasks at their own spacings (summarize_tb.py). Set nnUNet_raw / nnUNet_preprocessed /
# nnUNet_results (and nnUNet_n_proc_DA=1, OMP_NUM_THREADS=1 on a small CPU machine) first.
# usage: run_tb_grids.sh SETTING "DATASET_ID:DATASET_NAME:OUT ..."   SETTING: own | lung (owngrid.py's SETTINGS)
# e.g.   run_tb_grids.sh own "979:Dataset979_PaperOwnGridS0:outOwnTB_s0 978:Dataset978_PaperOwnGridS1:outOwnTB_s1"
HERE=$(cd "$(dirname "$0")" && pwd)
export OWNGRID_SETTING=$1
for job in $2; do
  IFS=: read -r d name out <<< "$job"
  nnUNetv2_versemi_benchmark -d "$d" -c 2d_cpu --plans-preset cpu_demo --epochs 20 --iterations 50 --val-iterations 4 \
    --folds all -device cpu --npp 1 --disable_tta --skip-val --budget-per task -o "$out" \
    --methods VerSemiTrainer_taskBatches > "$out.log" 2>&1 || exit 1
  python "$HERE/owngrid.py" predict "$name" "$out/pred_own_grid" VerSemiTrainer_taskBatches >> "$out.log" 2>&1 || exit 1
done
