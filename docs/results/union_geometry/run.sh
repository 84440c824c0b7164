# Per-task nnU-Net on the paper preset union's seed-0 per-task datasets, with each task's own 2d geometry and
# with the union's. Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results set as for the benchmark that
# wrote these per-task datasets (nnUNetv2_versemi_benchmark -d 990 ..., docs/BENCHMARKS.md), nnUNet_n_proc_DA=1.
cd "$(dirname "$0")"
for m in union own; do python run.py Dataset993_VSBench990_Spleen Spleen $m > log_spleen_$m.txt 2>&1; grep RESULT log_spleen_$m.txt; done
for m in union own; do python run.py Dataset994_VSBench990_Lung Lung $m > log_lung_$m.txt 2>&1; grep RESULT log_lung_$m.txt; done
