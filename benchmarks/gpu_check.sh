#!/usr/bin/env bash
# One prepared GPU check: extraction, align-stage and instruct-stage throughput (and MFU) on one
# accelerator, in under 8 minutes, with no internet. benchmarks/gpu_check.py says what it
# measures; BENCHMARKS.md ("GPU check") says how to read the numbers.
#
#   bash benchmarks/gpu_check.sh [--wheels DIR] [--timeout SECONDS] [gpu_check.py options]
#   bash benchmarks/gpu_check.sh --dry-run --out /tmp/gc     # tiny shapes, any machine, < 1 min
#
# Results: gpu_check.json and gpu_check.md in --out (default benchmarks/out/), written after
# every section, so a run stopped by the timeout still leaves what it measured.
#
# Python environment. The dev .venv does not travel to a GPU box: it is ~1.8 GB and holds the
# CPU build of torch. On the box, use its own Python with a CUDA torch (PYTHON=..., default
# .venv/bin/python when it exists, else python3) and add what it lacks:
#   - with PyPI: grep -v '^torch==' requirements.txt | pip install -r /dev/stdin
#   - without internet: make a folder of wheels on a machine that has PyPI and pass --wheels DIR;
#     they are installed into a temporary folder put first on PYTHONPATH, the box's own packages
#     are left alone. For a Python 3.12 box that already has torch, transformers' dependencies,
#     h5py, pyyaml, rich and pillow:
#       pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels \
#         transformers==5.24.0 sentence-transformers==6.2.0 peft==0.21.2 webdataset==1.0.2 braceexpand \
#         soundfile cffi pycparser soxr hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
#       pip wheel --no-deps -w wheels deepspeed==0.19.8    # deepspeed ships only an sdist
#     (pydantic-core must be the version pydantic pins.)
set -uo pipefail

cd "$(dirname "$0")/.."
wheels=""
limit=480
args=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --timeout) limit="$2"; shift 2 ;;
        *) args+=("$1"); shift ;;
    esac
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

if [[ -n "$wheels" ]]; then
    site="$(mktemp -d -t eg-gpu-check-site-XXXXXX)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$wheels"/*.whl \
        || { echo "gpu_check: installing the wheels in $wheels failed" >&2; exit 2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

if ! gpus="$("$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())')"; then
    echo "gpu_check: $PY cannot import torch; set PYTHON to an interpreter that has it" >&2
    exit 2
fi
echo "gpu_check: $PY, torch ${gpus% *}, CUDA available: ${gpus#* }"
# DeepSpeed probes for an accelerator and warns on a CPU box; on a GPU box it must find CUDA.
[[ "${gpus#* }" == "True" ]] || export DS_ACCELERATOR=cpu
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader

missing="$("$PY" - <<'EOF'
import importlib.util
need = ["transformers", "peft", "deepspeed", "sentence_transformers", "webdataset", "h5py", "soundfile", "soxr", "yaml", "rich", "PIL"]
print(" ".join(m for m in need if importlib.util.find_spec(m) is None))
EOF
)"
# Not fatal: each section fails on its own import and the others still run.
[[ -z "$missing" ]] || echo "gpu_check: missing Python packages: $missing (see the header of $0)" >&2

timeout --kill-after=20 "$limit" "$PY" benchmarks/gpu_check.py "${args[@]}"
code=$?
[[ $code -eq 124 ]] && echo "gpu_check: stopped after $limit s; the output folder holds the sections that finished" >&2
exit $code
