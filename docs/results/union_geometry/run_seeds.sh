# Per-task nnU-Net on Lung with its own 2d geometry and with the union's, over 3 labeled draws of the paper
# preset union at 20 % labels (merge seeds 12345, 12346, 12347: the benchmark's --seeds 3), 10 test cases.
# Needs nnUNet_raw / nnUNet_preprocessed / nnUNet_results (empty ones will do), nnUNet_n_proc_DA=1.
# Writes result_<dataset>_<mode>.json here; summarize with: python summarize.py
set -e
cd "$(dirname "$0")"
nnUNetv2_versemi_demo_data --preset paper --num-labeled 10 --num-unlabeled 10 --num-test 10
for s in 0 1 2; do
  u=$((980 + s)); n="PaperGeoL20S$s"; l=$((984 + s))
  [ -d "$nnUNet_raw/Dataset${u}_$n" ] || nnUNetv2_versemi_merge -d 911 912 913 914 -o $u -n $n \
      --task-names Pancreas LA Spleen Lung --labeled-fraction 0.2 --seed $((12345 + s)) -np 1
  [ -d "$nnUNet_preprocessed/Dataset${u}_$n" ] || nnUNetv2_versemi_plan_and_preprocess -d $u -c 2d -np 1 -npfp 1
  [ -d "$nnUNet_raw/Dataset${l}_Lung$s" ] || nnUNetv2_versemi_extract_task -d $u -t Lung -o $l -n Lung$s
  [ -d "$nnUNet_preprocessed/Dataset${l}_Lung$s" ] || nnUNetv2_plan_and_preprocess -d $l -c 2d -np 1 -npfp 1
done
for s in 0 1 2; do
  for m in union own; do
    [ -f "result_Dataset$((984 + s))_Lung${s}_$m.json" ] || \
      python run.py "Dataset$((984 + s))_Lung$s" Lung $m "Dataset$((980 + s))_PaperGeoL20S$s" > "log_lung${s}_$m.txt" 2>&1
    grep RESULT "log_lung${s}_$m.txt" || true
  done
done
