#!/usr/bin/env bash
# Build an offline wheelhouse for the air-gapped GPU box (CPython 3.12, manylinux x86_64): the
# dependencies its image lacks, at the versions CI tests, plus this project as a wheel.
#
#   bash scripts/build_wheelhouse.sh [OUT_DIR]          # default .whl/ (git-ignored)
#
# On the GPU box (no network):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site
#
# The image already holds torch 2.11, transformers 5.17, accelerate, peft, safetensors, tokenizers,
# huggingface-hub, pyarrow, pandas, xxhash, rich, pyyaml, numpy, sympy, ... (the list in the device
# notes, KINDS.md); everything below is what it lacks, with the dependencies of those (--no-deps:
# each one is named). One version of each: two versions of a package stop the whole install.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.whl}"
python="${PYTHON:-python3}"

packages=(
    # ours
    trl==1.16.0
    datasets==5.2.0
    llmcompressor==0.14.0.1
    compressed-tensors==0.19.0
    math-verify==0.9.0
    pydantic==2.14.3
    torchao==0.18.0
    hjson==3.1.0                    # deepspeed (its other dependencies are in the image)
    # theirs
    latex2sympy2_extended==1.11.0   # math-verify
    antlr4-python3-runtime==4.13.2  # latex2sympy2_extended[antlr4-13-2]
    auto-round==0.15.1              # llmcompressor
    loguru==0.7.3                   # llmcompressor
    dill==0.4.1                     # datasets
    multiprocess==0.70.19           # datasets
    pydantic-core==2.50.4           # pydantic (compiled: cp312 manylinux)
    annotated-types==0.8.0          # pydantic
    typing-inspection==0.4.5        # pydantic
    tzdata==2026.6                  # pandas, datasets
)

mkdir -p "$out"
rm -f "$out"/*.whl  # a stale second version of a package would break the install
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --platform any -d "$out" "${packages[@]}"
"$python" -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$out" .
# DeepSpeed (ZeRO-2/3 runs) is published as source only: its wheel, pure Python (ops built just in time, or not at
# all: the loop gives DeepSpeed torch's AdamW), builds here
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation -w "$out" \
    deepspeed==0.19.8

# the same tags as the GPU box: every wheel must be installable there, offline
check="$(mktemp -d)"
"$python" -m pip install --quiet --disable-pip-version-check --dry-run --no-index --no-deps \
    --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any --target "$check/site" "$out"/*.whl
rm -rf "$check"

ls -1 "$out"
echo "$(ls "$out"/*.whl | wc -l) wheels, $(du -sh "$out" | cut -f1) in $out"
