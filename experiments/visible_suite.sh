#!/usr/bin/env bash
# The visible benchmark suite of issue #15, through the README's own
# commands: the main job (every method, epsilon 1/3/8, seeds 0/1/2) on each
# benchmark, then the ablation (each AdaMix component off, the zero-noise
# diagnostic) reusing the main run. Copies each results.md/results.json and
# ablation.md/json to experiments/results/noise_aware/<benchmark>/.
#
#   bash experiments/visible_suite.sh /tmp/adamix_suite [benchmark ...]
#
# Benchmarks: digits, fm100 (Fashion-MNIST, EfficientNet-Lite0 features,
# 5 public + 100 private per class), fm100_p10 (10 public per class),
# fm500 (500 private per class). Each step resumes: rerun after a kill.
set -euo pipefail
root=${1:?usage: visible_suite.sh ROOT [benchmark ...]}
shift
benchmarks=${*:-digits fm100 fm100_p10 fm500}
repo=$(cd "$(dirname "$0")/.." && pwd)
out_root=$repo/experiments/results/noise_aware
cd "$repo"

flags_for() {
  case $1 in
    digits) echo "--config digits" ;;
    fm100) echo "--config fashion_mnist" ;;
    fm100_p10) echo "--config fashion_mnist --config.public_per_class=10" ;;
    fm500) echo "--config fashion_mnist --config.private_per_class=500" ;;
    *) echo "unknown benchmark $1" >&2; exit 2 ;;
  esac
}

for bench in $benchmarks; do
  flags=$(flags_for "$bench")
  out=$out_root/$bench
  mkdir -p "$out"
  # shellcheck disable=SC2086
  /usr/bin/time -f "$bench main: %e s wall, %U s user CPU, %M KB" \
    adamix-train $flags --workdir "$root/$bench" --config.progress=False \
    2>&1 | tee "$out/main.log"
  cp "$root/$bench/results.md" "$root/$bench/results.json" "$out/"
  variants=()
  if [ "$bench" != digits ] && [ "$bench" != fm100 ]; then
    # Only the zero-noise diagnostic on the larger benchmarks.
    variants=("--variants=adamix (defaults)")
  fi
  # shellcheck disable=SC2086
  /usr/bin/time -f "$bench ablation: %e s wall, %U s user CPU" \
    python -m experiments.ablation $flags --workdir "$root/${bench}_ablation" \
    --main_workdir "$root/$bench" --config.progress=False "${variants[@]}" \
    2>&1 | tee "$out/ablation.log"
  cp "$root/${bench}_ablation/ablation.md" \
     "$root/${bench}_ablation/ablation.json" "$out/"
done
