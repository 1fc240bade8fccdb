#!/usr/bin/env bash
# Fills a wheel folder for a GPU machine without network, for benchmarks/gpu_check.sh DIR:
#   DIR/a/  SimpleITK alone (the largest wheel; a device call carries at most 64 MiB, so it can travel on its own)
#   DIR/b/  nnU-Net, its packages that the GPU machine usually lacks, and this plugin's wheel built from the checkout
#
#   benchmarks/gpu_wheels.sh .gpu-wheels     # from the project root; keep DIR out of git (.git/info/exclude)
#
# The target is CPython 3.12 on x86-64 Linux (manylinux). Needs network to PyPI here; nothing on the GPU machine.
# On the GPU machine: python3 -m pip install --no-index --no-deps DIR/a/*.whl DIR/b/*.whl (into the machine's Python,
# not with --target, so that the plugin's .pth file registers the trainers with nnU-Net).
set -euo pipefail
DIR=${1:?give an output folder, e.g. .gpu-wheels}
mkdir -p "$DIR/a" "$DIR/b"
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp)
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    TARGET+=(--platform "$tag")
done
python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$DIR/a" simpleitk==2.5.7
python3 -m pip download -q --no-deps "${TARGET[@]}" -d "$DIR/b" \
    blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 nibabel==5.4.2 connected-components-3d==4.1.1
# published as source only: build the (pure-Python) wheels here
python3 -m pip wheel -q --no-deps -w "$DIR/b" nnunetv2==2.8.1 dynamic_network_architectures==0.4.4 \
    batchgenerators==0.25.5 batchgeneratorsv2==0.3.6 acvl_utils==0.2.6
rm -f "$DIR"/b/nnunet_dmoe-*.whl
python3 -m pip wheel -q --no-deps -w "$DIR/b" .
du -sh "$DIR/a" "$DIR/b"
