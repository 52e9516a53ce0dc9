#!/usr/bin/env bash
# The device runs of 2026-12-02 (one NVIDIA H200), one function per `run` call:
#   bash benchmarks/h200-2026-12-02.sh scan      # kernel build, tests/test_scan_kernel.py, the scan table, GPU-profile data
#   bash benchmarks/h200-2026-12-02.sh compare   # the original (645b6c0) beside ours: Phase 1, C*, a Phase-2 epoch
#   bash benchmarks/h200-2026-12-02.sh pipeline  # the README's GPU profile through dvc, stage timings
# Carried (git-ignored here): .whl (dvc, mlflow, datasets, chitchat-dataset, pydantic, ruamel.yaml and the
# dependencies the device image lacks, for Python 3.12) and .original (rato-tokyo/new-llm `git archive 645b6c0 src
# config.py`, plus gpu-data/: the carved GPU-profile splits the `scan` call made). Everything written comes back
# under $OUT (at most 8 files).
set -o pipefail
cd "$(dirname "$0")/.."

# the README's GPU profile ("Default size and the GPU profile"), as its dvc exp run command sets it
GPU_PROFILE=(-S device=cuda -S data.num_samples=800 -S tokenizer.vocab_size=8192
  -S model.context_dim=768 -S model.embed_dim=768 -S model.hidden_dim=1536
  -S phase1.precision=bf16 -S phase1.batch_tokens=65536 -S phase1.effective_rank_samples=16384
  -S phase2.precision=bf16 -S phase2.batch_size=4096 -S evaluate.batch_size=8192)

setup() {
  export PYTHONUNBUFFERED=1 CVFP_KERNEL_BUILD_DIR=/tmp/cvfpk CVFP_NO_PROGRESS=1
  local t=$SECONDS
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=$PWD/src:/tmp/site PATH=/tmp/site/bin:$PATH
  echo "wheels installed in $((SECONDS - t)) s"
}

stamp() {  # each line of stdin prefixed with the UTC time
  python3 -u -c 'import sys, time
for line in sys.stdin: print(time.strftime("%H:%M:%S", time.gmtime()), line, end="", flush=True)'
}

env_report() {
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw --format=csv
  uname -r; nproc; python3 --version; command -v git && git --version
  python3 - <<'EOF'
import importlib.metadata as m
for name in ("torch", "triton", "numpy", "pyarrow", "pandas", "fsspec", "huggingface_hub", "tokenizers", "datasets",
             "dvc", "mlflow", "pydantic", "ruamel.yaml", "sqlalchemy", "protobuf"):
    try:
        print(name, m.version(name))
    except Exception as err:
        print(name, "missing", err)
for mod in ("dvc.repo", "mlflow", "datasets", "chitchat_dataset", "cvfp.kernels", "cvfp.phase1"):
    try:
        __import__(mod)
        print("import", mod, "ok")
    except Exception as err:
        print("import", mod, "FAILED", type(err).__name__, err)
EOF
  (cd src && find . \( -name '*.py' -o -name '*.cu' -o -name '*.cpp' \) | sort | xargs sha256sum | sha256sum | cut -c1-16) \
    | sed 's/^/src tree sha256 prefix: /'
  sha256sum tests/test_scan_kernel.py benchmarks/original_side_by_side.py src/cvfp/kernels/scan.cu | cut -c1-16,65-
}

apply_overrides() {  # -S key=value ... written into params.yaml (this machine's copy), comments kept
  python3 - "$@" <<'EOF'
import sys
from ruamel.yaml import YAML
yaml = YAML()
with open("params.yaml") as f:
    tree = yaml.load(f)
args = [a for a in sys.argv[1:] if a != "-S"]
for item in args:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = tree
    for p in parents:
        node = node[p]
    node[leaf] = YAML(typ="safe", pure=True).load(value)
with open("params.yaml", "w") as f:
    yaml.dump(tree, f)
print("params.yaml:", " ".join(args))
EOF
}

scan() {
  setup
  env_report > "$OUT/env.txt" 2>&1; cat "$OUT/env.txt"
  { timeout 150 python3 -c "from cvfp.kernels import _build; import time; t=time.time(); _build.load(verbose=True); print('BUILD_SECONDS', time.time()-t)" 2>&1 | tail -25; } >> "$OUT/env.txt"
  grep -E "BUILD_SECONDS|registers|spill" "$OUT/env.txt" | tail -4
  timeout 200 python3 -m pytest -q -rA -p no:cacheprovider tests/test_scan_kernel.py > "$OUT/tests.txt" 2>&1
  echo "pytest exit $?"; tail -3 "$OUT/tests.txt"
  timeout 240 python3 benchmarks/original_side_by_side.py --part scan "${GPU_PROFILE[@]}" \
    --json benchmarks/h200-2026-12-02-scan.json 2>&1 | tee "$OUT/scan-log.txt" | grep -vE "^\s*$" | tail -12
  # the GPU profile's data stages, as the pipeline runs them, for the side-by-side call
  {
    apply_overrides -S data.num_samples=800 -S tokenizer.vocab_size=8192
    for stage in tokenizer cache carve; do
      t=$SECONDS; timeout 150 python3 pipeline/$stage.py 2>&1 | tail -4; echo "stage $stage exit $? in $((SECONDS - t)) s"
    done
    mkdir -p "$OUT/data" && cp data/splits/train.safetensors data/splits/val.safetensors data/tokenizer/tokenizer.json "$OUT/data/"
    sha256sum data/splits/*.safetensors data/tokenizer/tokenizer.json; cat metrics/data.json 2>/dev/null | head -40
  } > "$OUT/data-log.txt" 2>&1
  tail -8 "$OUT/data-log.txt"
}

compare() {
  setup
  env_report > "$OUT/env.txt" 2>&1; grep -E "H200|import|sha256" "$OUT/env.txt" | head -12
  timeout 570 python3 benchmarks/original_side_by_side.py --part compare "${GPU_PROFILE[@]}" \
    -S phase1.max_iterations=10 -S phase1.min_converged_ratio=1.0 --data .original/gpu-data \
    --tokens 65536 --original-budget-s "${BUDGET:-300}" --json benchmarks/h200-2026-12-02-original.json \
    2>&1 | tee "$OUT/compare-log.txt" | grep -vE "^(Iteration|=|PHASE|\s*$)" | tail -40
}

pipeline() {
  setup
  env_report > "$OUT/env.txt" 2>&1; grep -E "H200|git|import" "$OUT/env.txt"
  local t=$SECONDS
  {
    if command -v git > /dev/null; then
      git init -q . && echo /.original/ >> .git/info/exclude && git add -A \
        && git -c user.name=bench -c user.email=bench@localhost commit -qm "device snapshot" && echo "git snapshot $(git rev-parse --short HEAD)"
      timeout "${LIMIT:-540}" dvc exp run -n gpu-6x768 "${GPU_PROFILE[@]}"
    else
      echo "no git on this machine: dvc repro with core.no_scm and the profile written into params.yaml"
      dvc config core.no_scm true && apply_overrides "${GPU_PROFILE[@]}"
      timeout "${LIMIT:-540}" dvc repro
    fi
    echo "dvc exit $? after $((SECONDS - t)) s"
  } 2>&1 | stamp | tee "$OUT/pipeline-log.txt" | grep -E "Running stage|exit|error|Error|iterations|epoch 10|bpb" | tail -40
  tar -czf "$OUT/pipeline-metrics.tar.gz" metrics params.yaml dvc.lock 2>/dev/null
  for f in metrics/timing/*.json; do echo "$f: $(python3 -c "import json,sys; d=json.load(open('$f')); print({k: round(v, 2) for k, v in d.items() if isinstance(v, (int, float))})")"; done
}

"$@"
