#!/usr/bin/env bash
# Set up the test environments and run the tests: `bash tools/run_tests.sh [oldest|forge|newest|all]` (default: all).
# Each stack gets its own virtual environment in .venv-<stack> (reused when its requirements file is unchanged).
# k-diffusion is installed without its dependencies: the tests use only its sampling schedule code, and its
# training stack (torchvision, kornia, wandb, ...) is not needed.
set -euo pipefail
cd "$(dirname "$0")/.."
stacks=("$@")
[ ${#stacks[@]} -eq 0 ] || [ "${stacks[0]}" = all ] && stacks=(oldest forge newest)
python=${PYTHON:-python3}

for stack in "${stacks[@]}"; do
  req="tools/requirements-$stack.txt"
  [ -f "$req" ] || { echo "unknown stack '$stack' (no $req)" >&2; exit 2; }
  venv=".venv-$stack"
  stamp="$venv/.requirements"
  if ! cmp -s "$req" "$stamp" 2>/dev/null; then
    echo "== setting up $venv from $req"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    grep -v '^k-diffusion' "$req" > "$venv/req.txt"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$venv/req.txt"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps "$(grep '^k-diffusion' "$req")"
    cp "$req" "$stamp"
  fi
  echo "== tests on the $stack stack: $("$venv/bin/python" -c 'import transformers, torch, huggingface_hub as h; print(f"transformers {transformers.__version__}, torch {torch.__version__}, huggingface_hub {h.__version__}")')"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests
done
if [ -x .venv-newest/bin/ruff ]; then
  echo "== ruff"
  .venv-newest/bin/ruff check .
fi
