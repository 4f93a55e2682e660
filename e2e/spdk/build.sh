#!/usr/bin/env bash
# Builds SPDK v24.01's NVMe-oF target and NVMe host tools for the interop
# tests (e2e/spdk), from a source tree the user lays out, into a cache
# outside the repository. Never part of `make test`: CI cannot fetch SPDK.
#
#   make spdk SPDK_SRC=/path/to/spdk      or   e2e/spdk/build.sh /path/to/spdk
#
# The source tree: the spdk/spdk repository at tag v24.01 (commit
# 0786843e99, "SPDK 24.01") with these submodules laid in:
#   dpdk/          spdk/dpdk        afe4186365c4435c51ed9a8fd2550ee16c6c17db
#   isa-l/         spdk/isa-l       bd226375027899087bd48f3e59b910430615cc0a
#   isa-l-crypto/  intel/isa-l_crypto 08297dc3e76d65e1bad83a9c9f9e49059cf806b5
# (`git clone --branch v24.01 --recurse-submodules https://github.com/spdk/spdk`
# gives all of them, and a few more submodules this build does not use.)
#
# The cache ($SPDK_CACHE, default ${XDG_CACHE_HOME:-~/.cache}/ublk-nvmeof/spdk/v24.01):
#   bin/nvmf_tgt bin/spdk_nvme_perf bin/spdk_nvme_identify bin/spdk_nvme_discover
#   scripts/rpc.py python/spdk/   the JSON-RPC client nvmf_tgt is configured with
#   BUILT                         written last: the build is complete
#   tree/                         the build tree (deletable; kept for rebuilds)
# e2e/spdk.Find reads the same path; SPDK_CACHE overrides it in both.
#
# Build dependencies (Debian): meson ninja-build python3-pyelftools
# libnuma-dev uuid-dev libaio-dev libssl-dev libjson-c-dev libncurses-dev
# nasm autoconf automake libtool pkg-config. About 2.5 minutes on 2 cores.
set -euo pipefail

readonly SPDK_TAG=v24.01
readonly CONFIGURE_FLAGS=(
	--disable-tests --disable-unit-tests --disable-examples
	--without-crypto --without-vhost --without-virtio --without-fio
	--without-idxd --without-nvme-cuse --without-fuse --without-rdma
	--without-ocf --without-xnvme --without-vfio-user
)
readonly APPS=(nvmf_tgt spdk_nvme_perf spdk_nvme_identify spdk_nvme_discover)

die() { echo "spdk build: $*" >&2; exit 1; }

usage() {
	echo "usage: $0 SPDK_SOURCE_DIR   (or SPDK_SRC=... $0)" >&2
	echo "  the spdk/spdk repository at tag $SPDK_TAG with submodules dpdk (afe4186365c4)," >&2
	echo "  isa-l (bd2263750278) and isa-l-crypto (08297dc3e76d) laid in" >&2
	exit 2
}

# check_sources names exactly what is missing from the source tree.
check_sources() {
	local src=$1 missing=()
	[[ -x $src/configure && -f $src/include/spdk/version.h ]] ||
		missing+=("$src: the spdk/spdk repository at tag $SPDK_TAG (commit 0786843e99)")
	if [[ -f $src/include/spdk/version.h ]]; then
		local major minor
		major=$(awk '$1 == "#define" && $2 == "SPDK_VERSION_MAJOR" {print $3}' "$src/include/spdk/version.h")
		minor=$(awk '$1 == "#define" && $2 == "SPDK_VERSION_MINOR" {print $3}' "$src/include/spdk/version.h")
		[[ $major == 24 && $minor == 1 ]] ||
			missing+=("$src is SPDK $major.$minor, not $SPDK_TAG: check out tag $SPDK_TAG")
	fi
	[[ -f $src/dpdk/meson.build ]] ||
		missing+=("$src/dpdk: submodule spdk/dpdk at afe4186365c4435c51ed9a8fd2550ee16c6c17db")
	[[ -f $src/isa-l/Makefile.am ]] ||
		missing+=("$src/isa-l: submodule spdk/isa-l at bd226375027899087bd48f3e59b910430615cc0a")
	[[ -f $src/isa-l-crypto/Makefile.am ]] ||
		missing+=("$src/isa-l-crypto: submodule intel/isa-l_crypto at 08297dc3e76d65e1bad83a9c9f9e49059cf806b5")
	if ((${#missing[@]})); then
		echo "spdk build: the source tree lacks:" >&2
		printf '  %s\n' "${missing[@]}" >&2
		echo "  (git clone --branch $SPDK_TAG --recurse-submodules https://github.com/spdk/spdk gives all of them)" >&2
		exit 1
	fi
}

# check_tools names the Debian packages whose tools or headers are missing.
check_tools() {
	local missing=() cmd pkg header
	for cmd in meson:meson ninja:ninja-build nasm:nasm autoreconf:autoconf \
		automake:automake libtoolize:libtool pkg-config:pkg-config python3:python3 make:make cc:gcc; do
		command -v "${cmd%%:*}" >/dev/null || missing+=("${cmd#*:}")
	done
	# DPDK's meson.build imports elftools into meson's own interpreter,
	# which need not be the python3 first on PATH.
	local meson_python
	meson_python=$(command -v meson >/dev/null && sed -n '1s/^#! *//p' "$(command -v meson)")
	${meson_python:-python3} -c 'import elftools' 2>/dev/null ||
		missing+=("python3-pyelftools (for ${meson_python:-python3})")
	for header in numa.h:libnuma-dev uuid/uuid.h:uuid-dev libaio.h:libaio-dev \
		openssl/ssl.h:libssl-dev json-c/json.h:libjson-c-dev ncurses.h:libncurses-dev; do
		echo "#include <${header%%:*}>" | cc -E -x c - >/dev/null 2>&1 || missing+=("${header#*:}")
	done
	if ((${#missing[@]})); then
		die "missing build dependencies: apt-get install ${missing[*]}"
	fi
}

# copy_tree copies the sources into the cache: SPDK and DPDK build inside
# their own trees, and the user's tree stays untouched.
copy_tree() {
	local src=$1 tree=$2
	rm -rf "$tree"
	mkdir -p "$tree"
	cp -a "$src/." "$tree/"
}

build_tree() {
	local tree=$1 jobs
	jobs=$(nproc)
	(cd "$tree" && nice -n 10 ./configure "${CONFIGURE_FLAGS[@]}")
	nice -n 10 make -C "$tree" -j"$jobs"
}

# install_outputs copies the binaries and the RPC client beside the tree and
# writes BUILT last, so an interrupted build never looks complete.
install_outputs() {
	local tree=$1 cache=$2 app
	rm -f "$cache/BUILT"
	rm -rf "$cache/bin" "$cache/scripts" "$cache/python"
	mkdir -p "$cache/bin" "$cache/scripts"
	for app in "${APPS[@]}"; do
		[[ -x $tree/build/bin/$app ]] || die "the build made no $tree/build/bin/$app"
		cp "$tree/build/bin/$app" "$cache/bin/"
	done
	cp "$tree/scripts/rpc.py" "$cache/scripts/"
	cp -a "$tree/python" "$cache/python"
	{
		echo "spdk $SPDK_TAG"
		echo "source $(realpath "$SRC")"
		echo "configure ${CONFIGURE_FLAGS[*]}"
		echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
	} >"$cache/BUILT"
}

SRC=${1:-${SPDK_SRC:-}}
[[ -n $SRC ]] || usage
[[ -d $SRC ]] || die "$SRC: no such directory"
SRC=$(realpath "$SRC")
CACHE=${SPDK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ublk-nvmeof/spdk/$SPDK_TAG}

check_sources "$SRC"
check_tools
echo "spdk build: $SRC -> $CACHE"
copy_tree "$SRC" "$CACHE/tree"
build_tree "$CACHE/tree"
install_outputs "$CACHE/tree" "$CACHE"
echo "spdk build: done: $CACHE/bin/{$(IFS=,; echo "${APPS[*]}")}"
