#!/usr/bin/env bash
# Validate the course on a CUDA GPU: the whole pytest suite with the Triton kernels *compiled* (not interpreted),
# then every notebook and exercise notebook under nbval, executing on the GPU wherever a notebook picks a device,
# with the course model in models/kvcourse-llama/.  Logs and a summary go to a folder.
#
# Usage:  bash scripts/gpu_validate.sh [LOG_DIR]
#         LOG_DIR defaults to $OUT when set (the lab's GPU runner), else runs/gpu_validate_<UTC time>/.
#         Environment: PYTHON (default python3); PYTEST_ARGS (extra pytest arguments for both runs);
#         PARTS="tests notebooks" (default; name one to run only that part, e.g. to fit a time limit);
#         JUNIT=1 to also write pytest.xml / nbval.xml (CI artifacts).
#
# Machines without internet: the GPU image has torch, triton, transformers and pytest but no Jupyter stack.
# On a machine with PyPI run  bash scripts/fetch_gpu_wheels.sh  (fills .whl/, ~15 MB, git-ignored), bring .whl/
# along with the checkout, and this script installs those wheels with
#     pip install --no-index --no-deps --target <dir>   and puts <dir> on PYTHONPATH.
# Nothing is downloaded here; HF_HUB_OFFLINE=1 makes any hub access fail fast instead of hanging.
# The notebooks read the course's books through KVCOURSE_DATA_DIR (without it they try the hub and fail offline).
# Where the whole book folder cannot travel, scripts/make_gpu_data_subset.py writes an 18-book subset they run on
# (~3.5 MB) to .data-gpu/ (git-ignored): bring that along and export KVCOURSE_DATA_DIR=$PWD/.data-gpu.
#
# Exit status: 0 only if both pytest runs pass.  The summary (summary.md) lists the GPU, versions, and the
# closing line of each run; commit a copy of it as the record of a validation run.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
STAMP="$(date -u +%Y%m%d_%H%M%S)"
LOG_DIR="${1:-${OUT:-runs/gpu_validate_$STAMP}}"
mkdir -p "$LOG_DIR"
PY="${PYTHON:-python3}"
read -r -a EXTRA <<< "${PYTEST_ARGS:-}"
PARTS="${PARTS:-tests notebooks}"
junit() { [[ "${JUNIT:-0}" == 1 ]] && echo "--junitxml=$LOG_DIR/$1.xml"; }

# -- 1. wheels carried for an offline machine ------------------------------------------------------------------
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE="${KVCOURSE_WHEEL_SITE:-/tmp/kvcourse-site}"
  echo "installing $(ls .whl/*.whl | wc -l) carried wheels from .whl/ into $SITE"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "pip could not install the carried wheels" >&2; exit 3; }
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# -- 2. the project itself, without installing it ---------------------------------------------------------------
export PYTHONPATH="$ROOT:$ROOT/kernels${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET            # compiled kernels
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

"$PY" - <<'EOF' 2>&1 | tee "$LOG_DIR/environment.txt"
import importlib, os, platform, sys
import torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    print("ERROR: no CUDA device visible; this script validates the GPU lane"); sys.exit(1)
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", p.multi_processor_count, "SMs")
for name in ("triton", "transformers", "pytest", "nbval", "ipykernel", "jupyter_client", "nbformat", "datasets",
             "matplotlib", "refimpl", "kvkernels"):
    try:
        m = importlib.import_module(name)
        print(name, getattr(m, "__version__", "?"), os.path.dirname(getattr(m, "__file__", "") or "?"))
    except Exception as e:  # report, don't stop: pytest will say what fails
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
print("course model present:", os.path.isfile("models/kvcourse-llama/config.json"))
EOF
[[ ${PIPESTATUS[0]} -eq 0 ]] || exit 1

# -- 3. every test, kernels compiled -------------------------------------------------------------------------
rc_tests=0
rc_nb=0
if [[ " $PARTS " == *" tests "* ]]; then
  echo "== pytest tests kernels/tests (compiled Triton) =="
  "$PY" -m pytest tests kernels/tests -ra -q -p no:cacheprovider $(junit pytest) "${EXTRA[@]}" \
    2>&1 | tee "$LOG_DIR/pytest.log"
  rc_tests=${PIPESTATUS[0]}
else
  echo "(tests not run: PARTS=$PARTS)" > "$LOG_DIR/pytest.log"
fi

# -- 4. every notebook and exercise under nbval --------------------------------------------------------------
if [[ " $PARTS " == *" notebooks "* ]]; then
  echo "== pytest --nbval-lax notebooks exercises =="
  "$PY" -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=900 -ra -q -p no:cacheprovider \
    $(junit nbval) "${EXTRA[@]}" notebooks exercises 2>&1 | tee "$LOG_DIR/nbval.log"
  rc_nb=${PIPESTATUS[0]}
else
  echo "(notebooks not run: PARTS=$PARTS)" > "$LOG_DIR/nbval.log"
fi

# -- 5. summary ----------------------------------------------------------------------------------------------
closing() { grep -E "[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran|not run" "$1" | tail -1; }
{
  echo "# GPU validation $STAMP (UTC)"
  echo
  sed 's/^/- /' "$LOG_DIR/environment.txt"
  echo
  echo "| run | exit | result |"
  echo "|---|---|---|"
  echo "| pytest tests kernels/tests (compiled) | $rc_tests | $(closing "$LOG_DIR/pytest.log") |"
  echo "| pytest --nbval-lax notebooks exercises | $rc_nb | $(closing "$LOG_DIR/nbval.log") |"
  echo
  echo "Failures and skips:"
  echo
  grep -hE "^(FAILED|ERROR|SKIPPED)" "$LOG_DIR/pytest.log" "$LOG_DIR/nbval.log" | sed 's/^/    /' || echo "    none"
} > "$LOG_DIR/summary.md"
cat "$LOG_DIR/summary.md"
echo "logs in $LOG_DIR"
[[ $rc_tests -eq 0 && $rc_nb -eq 0 ]]
