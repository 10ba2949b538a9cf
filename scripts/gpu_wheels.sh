#!/usr/bin/env bash
# Fetch the wheels the GPU machine lacks into .whl/ for the device tool to carry (python 3.12, x86-64):
# Hydra (hydra-core, omegaconf, antlr4-python3-runtime) and the two launchers the sweep tests use
# (joblib, submitit), and wandb with its needs (about 27 MB; wandb's protobuf and pydantic come along,
# since its generated code needs a matching protobuf). Run once, here, from the repository root; .whl/ is
# ignored locally (.git/info/exclude), never committed. Together they stay under the tool's 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
pure=(hydra-core==1.3.8 omegaconf==2.3.1 hydra-joblib-launcher==1.2.0 hydra-submitit-launcher==1.2.0
      submitit==1.5.4)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl "${pure[@]}"
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d .whl wandb==0.31.0
# antlr4 4.9.3 (omegaconf's pin) ships only an sdist: build its (pure-Python) wheel here.
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
du -sh .whl
