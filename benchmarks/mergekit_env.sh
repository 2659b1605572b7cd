#!/usr/bin/env bash
# Create benchmarks/.venv-mergekit: a venv of its own for mergekit, the reference merger that
# benchmarks/compare_mergekit.py times hm3 against. It stays apart from .venv so that mergekit's
# dependencies (peft, datasets, accelerate, ...) never reach hm3's environment.
#
# CPU torch goes in FIRST: mergekit asks only for torch>=2.0, and a plain `pip install torch` on
# Linux pulls the multi-GB CUDA build. Where pip's configured sources (e.g. PIP_FIND_LINKS, as
# `make setup` relies on) offer a +cpu wheel it is used; otherwise the PyTorch CPU index is.
# mergekit 0.1.5 wants transformers>=5,<6, the same major version as hm3's.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${MERGEKIT_VENV:-$here/.venv-mergekit}"
python="${PYTHON:-python3}"
torch_version="${TORCH_VERSION:-2.13.0}"
mergekit_version="${MERGEKIT_VERSION:-0.1.5}"
cpu_index="https://download.pytorch.org/whl/cpu"

if [[ -x "$venv/bin/mergekit-yaml" ]] && "$venv/bin/python" -c "import mergekit, psutil" 2>/dev/null; then
    echo "mergekit venv ready: $venv"
    exit 0
fi
"$python" -m venv "$venv"
pip=("$venv/bin/pip" --disable-pip-version-check)

# Which torch wheel would pip take? Anything but a +cpu build means the CUDA one: use the CPU index.
chosen="$("${pip[@]}" install --dry-run --quiet --no-deps --report - "torch==$torch_version" \
          | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])')"
if [[ "$chosen" == *+cpu ]]; then
    "${pip[@]}" install --quiet "torch==$torch_version"
else
    echo "pip's default source offers torch $chosen (a CUDA build); using $cpu_index"
    "${pip[@]}" install --quiet "torch==$torch_version" --index-url "$cpu_index"
fi
# The constraint keeps mergekit's resolver from replacing the CPU torch.
constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
"$venv/bin/python" -c 'import torch; print("torch==" + torch.__version__)' > "$constraints"
"${pip[@]}" install --quiet "mergekit==$mergekit_version" psutil --constraint "$constraints"

"$venv/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers
assert not torch.version.cuda, f"a CUDA torch got in: {torch.__version__}"
print("mergekit", md.version("mergekit"), "| torch", torch.__version__,
      "| transformers", transformers.__version__)
PY
echo "mergekit venv ready: $venv"
