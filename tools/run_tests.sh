#!/usr/bin/env bash
# Set up the test environments and run the tests: `bash tools/run_tests.sh [oldest|forge|newest|all]` (default: all).
# Each stack gets its own virtual environment in .venv-<stack> (reused when its requirements file is unchanged); the
# ones to build are built side by side first (mostly downloads), then the stacks' tests run one after another.
# k-diffusion is installed without its dependencies: the tests use only its sampling code, and its training stack
# (torchvision, kornia, wandb, ...) is not needed.
# The sampler matrix of tests/webui/test_precompute.py runs whole on the forge stack and one sampler of each family on
# the others (ELLA_SAMPLERS=family): they differ from it only in transformers / gradio / torch versions, and CI runs
# on a busy 2-core machine with 30 minutes for everything.
# pip keeps no cache (--no-cache-dir): the three stacks' wheels (the oldest's torch alone brings 3 GB of CUDA
# libraries) would otherwise sit on disk twice, and a CI machine with little disk ran out of space setting them up.
set -euo pipefail
cd "$(dirname "$0")/.."
stacks=("$@")
[ ${#stacks[@]} -eq 0 ] || [ "${stacks[0]}" = all ] && stacks=(oldest forge newest)
python=${PYTHON:-python3}
start=$(date +%s)

elapsed() { echo "$(( $(date +%s) - start ))s"; }

setup() {  # setup STACK: (re)build .venv-STACK if its requirements changed; output to .venv-STACK.log
  local stack=$1 req="tools/requirements-$1.txt" venv=".venv-$1"
  rm -rf "$venv"
  "$python" -m venv "$venv"
  grep -v '^k-diffusion' "$req" > "$venv/req.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir -r "$venv/req.txt"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-cache-dir --no-deps "$(grep '^k-diffusion' "$req")"
  cp "$req" "$venv/.requirements"
}

building=()
for stack in "${stacks[@]}"; do
  req="tools/requirements-$stack.txt"
  [ -f "$req" ] || { echo "unknown stack '$stack' (no $req)" >&2; exit 2; }
  if ! cmp -s "$req" ".venv-$stack/.requirements" 2>/dev/null; then
    echo "== setting up .venv-$stack from $req ($(elapsed))"
    setup "$stack" > ".venv-$stack.log" 2>&1 &
    building+=("$stack:$!")
  fi
done
for entry in "${building[@]}"; do
  stack=${entry%%:*}
  if ! wait "${entry#*:}"; then
    echo "== setting up .venv-$stack failed:" >&2
    grep -v "is ignored: it is neither a file nor a directory" ".venv-$stack.log" >&2 || true
    exit 1
  fi
  echo "== .venv-$stack ready ($(elapsed))"
done

for stack in "${stacks[@]}"; do
  venv=".venv-$stack"
  samplers=family
  [ "$stack" = forge ] && samplers=all
  echo "== tests on the $stack stack: $("$venv/bin/python" -c 'import transformers, torch, huggingface_hub as h; print(f"transformers {transformers.__version__}, torch {torch.__version__}, huggingface_hub {h.__version__}")'), samplers: $samplers ($(elapsed))"
  ELLA_SAMPLERS=$samplers "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
done
if [ -x .venv-newest/bin/ruff ]; then
  echo "== ruff ($(elapsed))"
  .venv-newest/bin/ruff check .
fi
echo "== done ($(elapsed))"
