#!/usr/bin/env bash
# Download, on a machine that reaches PyPI, the wheels that scripts/gpu_validate.sh installs on a GPU machine
# without internet.  The GPU image already has Python 3.12, torch, triton, transformers, tokenizers, pytest,
# matplotlib, numpy, pandas, pyarrow, psutil, pygments, ...; it lacks the Jupyter stack that nbval needs
# (nbval, ipykernel, jupyter_client, jupyter_core, nbformat, nbclient, pyzmq, tornado, traitlets, ipython, ...)
# and `datasets` (refimpl.data).  This fetches exactly those, pinned, for CPython 3.12 on manylinux x86_64,
# without dependencies (--no-deps: the list below *is* the closure, minus what the image ships).
#
# Usage:   bash scripts/fetch_gpu_wheels.sh [DEST]          (default DEST: .whl/, git-ignored)
# Then:    carry .whl to the GPU machine and run  bash scripts/gpu_validate.sh  there; it installs them with
#          pip install --no-index --no-deps --target.
# To refresh the pins: in an environment where `pytest --nbval-lax` works, `pip list` these names.
#
# QUANTCACHE=1 also fetches, into DEST/quantcache/, the optional backends of transformers' QuantizedCache that
# benchmarks/bench_kivi.py --part e2e compares against (optimum-quanto; hqq, which PyPI has only as an sdist, is
# built into a pure-Python wheel here) and what the image lacks of their requirements.  gpu_validate.sh does not
# install them (only DEST/*.whl); for the benchmark, on the GPU machine:
#   pip install --no-index --no-deps --target /tmp/qsite .whl/quantcache/*.whl
#   PATH=/tmp/qsite/bin:$PATH PYTHONPATH=/tmp/qsite:$PWD:$PWD/kernels python3 benchmarks/bench_kivi.py --part e2e
set -euo pipefail
cd "$(dirname "$0")/.."
DEST="${1:-.whl}"
PY="${PYTHON:-python3}"
MAX_MB=30

WHEELS=(
  # nbval and the kernel it drives
  nbval==0.11.0 ipykernel==7.4.0 jupyter_client==8.10.0 jupyter_core==5.9.1 nbformat==5.11.1 nbclient==0.11.0
  pyzmq==27.3.0 tornado==6.6.1 traitlets==5.16.1 comm==0.2.3 debugpy==1.8.22 nest-asyncio2==1.7.4
  platformdirs==4.14.7 matplotlib-inline==0.2.2
  # IPython and its dependencies
  ipython==9.18.1 ipython_pygments_lexers==1.1.1 jedi==0.20.1 parso==0.8.7 pexpect==4.9.0 ptyprocess==0.7.0
  prompt_toolkit==3.0.53 wcwidth==0.9.4 stack-data==0.6.3 executing==2.3.0 asttokens==3.0.2 pure_eval==0.2.4
  # nbformat's schema validation
  fastjsonschema==2.22.3 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0
  rpds-py==2026.9.1
  # refimpl.data (Hugging Face datasets) and what the image lacks of its requirements
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)

mkdir -p "$DEST"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: \
  --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --platform any \
  -d "$DEST" "${WHEELS[@]}"

# One version per package, or `pip install --no-index` refuses the set.
dups=$(ls "$DEST"/*.whl | xargs -n1 basename | sed -E 's/-[0-9][^-]*-.*//' | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [[ -n "$dups" ]]; then
  echo "more than one version in $DEST of: $dups; remove the stale ones" >&2
  exit 1
fi
n=$(ls "$DEST"/*.whl | wc -l)
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"/*.whl | awk '{printf "%9d  %s\n", $5, $9}'
echo "$n wheels, $((bytes / 1024 / 1024)) MiB in $DEST (limit ${MAX_MB} MiB)"
if (( bytes > MAX_MB * 1024 * 1024 )); then
  echo "wheels exceed ${MAX_MB} MiB" >&2
  exit 1
fi

if [[ "${QUANTCACHE:-0}" == 1 ]]; then
  QDEST="$DEST/quantcache"
  mkdir -p "$QDEST"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$QDEST" optimum-quanto==0.2.7 ninja==1.13.2 einops==0.8.2 accelerate==1.15.0 termcolor==3.3.0
  "$PY" -m pip wheel --quiet --no-deps --no-build-isolation -w "$QDEST" hqq==0.2.8.post1
  ls -l "$QDEST"/*.whl | awk '{printf "%9d  %s\n", $5, $9}'
fi
