#!/usr/bin/env bash
# GPU benchmark of ditgraft: operators, DiT-XL/2 and PixArt-Sigma models, sampling steps (ditgraft.bench.suite).
#
#   scripts/gpu_bench.sh [OUT_DIR]            on a machine with a CUDA GPU (bf16; about ten minutes)
#   scripts/gpu_bench.sh --dry-run            print the plan, install and run nothing
#   scripts/gpu_bench.sh --tiny [OUT_DIR]     every section at toy sizes on the CPU (checks the suite itself)
#   scripts/gpu_bench.sh OUT_DIR -- --sections ops_fwd model    arguments after -- go to ditgraft.bench.suite
#
# Installs ditgraft (with diffusers, for PixArt) from this checkout, then tries the optional kernels mamba_ssm and
# causal-conv1d (at most four minutes each; without them those operators run their PyTorch paths and
# the tables say so). Writes OUT_DIR/results.json and OUT_DIR/results.md (default bench_gpu/).
set -uo pipefail
cd "$(dirname "$0")/.."

preset=gpu
dry=""
out=""
extra=()
while (($#)); do
  arg=$1
  shift
  case "$arg" in
    --) extra=("$@"); break ;;
    --dry-run) dry=--dry-run ;;
    --tiny) preset=tiny ;;
    -*) echo "unknown option $arg (use --dry-run, --tiny or an output folder)" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
out=${out:-bench_$preset}
py=${PYTHON:-python}

if [[ -z "$dry" && "$preset" == gpu ]]; then
  if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "no CUDA device visible to torch: run with --tiny for the CPU check" >&2
    exit 1
  fi
  "$py" -m pip install -q -e ".[diffusers]" || { echo "pip install of ditgraft failed" >&2; exit 1; }
  # optional kernels: their setup fetches a prebuilt wheel where one matches torch and CUDA, else compiles (far
  # longer than the benchmark), so each attempt is bounded in time
  for pkg in causal-conv1d mamba-ssm; do
    timeout 240 "$py" -m pip install -q --no-build-isolation --prefer-binary "$pkg" \
      || echo "optional $pkg not installed: its operators run their PyTorch paths" >&2
  done
fi

exec "$py" -m ditgraft.bench.suite --preset "$preset" --out "$out" $dry ${extra[@]+"${extra[@]}"}
