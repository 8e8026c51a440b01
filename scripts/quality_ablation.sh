#!/bin/bash
# Reproduces the quality ablation rows of docs/RESULTS.md. For each recipe in docs/experiments/quality (or the names
# given: a file there or a bundled recipe such as testbed_hyena_x_50): stage 1 and stage 2 in runs/quality/NAME, then
# the decision protocol against the shipped teacher (seeds 0-2, 1,500 samples per model; the teacher's samples are
# drawn once in runs/quality/eval/testbed and reused), and, where the recipe trains the random-init baseline, the same
# protocol for it against the grafted student. About 4-12 min per row on a 2-core CPU; run one at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
out=runs/quality
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  names=($(ls docs/experiments/quality/*.yaml | xargs -n1 basename | sed 's/\.yaml$//'))
fi
for name in "${names[@]}"; do
  recipe="docs/experiments/quality/$name.yaml"
  [ -f "$recipe" ] || recipe="$name"
  ditgraft graft "$recipe" --run-dir "$out/$name" --stages stage1,stage2 --quiet
  ditgraft eval "$out/$name/student.safetensors" --seeds 0,1,2 --against testbed --out "$out/eval/$name" \
    --against-out "$out/eval/testbed"
  if [ -f "$out/$name/baseline_random/student.safetensors" ]; then
    ditgraft eval "$out/$name/baseline_random/student.safetensors" --seeds 0,1,2 \
      --against "$out/$name/student.safetensors" --out "$out/eval/${name}_random" --against-out "$out/eval/$name" \
      --target-ratio 1.0 --target-gap 0.0
  fi
done
