#!/usr/bin/env bash
# Installs everything pystratovirt and its tests need: Debian packages (compiler for the probe
# guest, kernel build tools and source for the lean Linux guest, busybox for its initramfs,
# e2fsprogs for disk images, iproute2 for network tests, libseccomp2 for the seccomp filters,
# strace for bench/syscalls.py) and the Python package with test extras.
set -euo pipefail
cd "$(dirname "$0")"

APT_PACKAGES=(
    build-essential binutils bc flex bison libelf-dev libssl-dev
    linux-source-6.1 busybox-static e2fsprogs cpio lz4 zstd xz-utils kmod
    iproute2 iputils-ping python3-venv acpica-tools libseccomp2 strace
)

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python3 -m pip install -q -e '.[test]'
echo "setup: done"
