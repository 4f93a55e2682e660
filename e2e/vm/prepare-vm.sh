#!/usr/bin/env bash
# prepare-vm.sh: install what the e2e VM needs on a Debian host and cache the
# kernels the VM boots (never installed on the host: downloaded with
# `apt-get download` and unpacked into the cache):
#
#   lts     Debian's 6.12 LTS kernel of bookworm-security (the floor), resolved
#           through the host's `linux-image-6.12-amd64`;
#   newest  the newest kernel of trixie-backports, resolved through that
#           suite's `linux-image-amd64` (7.3 on 2026-11-30; the next one is
#           picked up with `--update`). The host's apt sources are never
#           changed: trixie-backports is reached through a private apt
#           configuration in $CACHE/apt.
#
# Usage: prepare-vm.sh [--update] [lts|newest|all ...]   (default: all, or
# $E2E_KERNEL). E2E_KERNEL may also name a kernel by its version ("6.12",
# "7.3"): a version chooses the kernel whose role has it, which is only known
# once cached, so an uncached version prepares all. --update resolves the
# packages again (a warm cache otherwise needs no network).
#
# Result, in $UBLK_NVMEOF_VM_CACHE (default ~/.cache/ublk-nvmeof/vm), one
# directory per kernel, <role>/:
#   vmlinuz             the kernel
#   modules/NN-name.ko  decompressed modules, NN = load order
#   modules/params      "name args" lines for modules that take some
#   release             the kernel release string
#   package             the linux-image package it came from
#   config              the kernel's build configuration
# (current/, the layout before there were two kernels, is left as it is;
# e2e/vm reads it when lts/ is missing.)
# Idempotent: a warm cache costs well under a second.
set -euo pipefail

CACHE=${UBLK_NVMEOF_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ublk-nvmeof/vm}
# Modules the guest loads, dependencies first (each one's own dependencies,
# soft ones included, are resolved from the kernel's modules.dep below; on
# 7.x ext4's "crc32c" soft dependency is the module crc32c-cryptoapi).
MODULES=(configfs nvme-tcp nvmet-tcp brd ublk_drv null_blk loop veth ext4)

log() { printf '[prepare-vm] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

update=0
roles=()
for a in "$@"; do
  case "$a" in
    --update) update=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) roles+=("$a") ;;
  esac
done
[ ${#roles[@]} -gt 0 ] || read -r -a roles <<<"${E2E_KERNEL:-all}"
[ ${#roles[@]} -gt 0 ] || roles=(all)
want=()
for r in "${roles[@]//,/ }"; do
  case "$r" in
    all) want+=(lts newest) ;;
    lts|newest) want+=("$r") ;;
    *)
      # A version: the role whose cached release has it, else every role.
      found=
      for role in lts newest; do
        rel=$(cat "$CACHE/$role/release" 2>/dev/null || true)
        case "$rel" in "$r".*|"$r"-*|"$r"+*) found=$role ;; esac
      done
      [ -z "$found" ] && [ "$r" = 6.12 ] && found=lts
      if [ -n "$found" ]; then want+=("$found"); else want+=(lts newest); fi
      ;;
  esac
done

need_pkgs=()
command -v qemu-system-x86_64 >/dev/null || need_pkgs+=(qemu-system-x86)
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || need_pkgs+=(busybox-static)
command -v depmod >/dev/null || need_pkgs+=(kmod)
command -v modprobe >/dev/null || need_pkgs+=(kmod)
command -v xz >/dev/null || need_pkgs+=(xz-utils)
command -v fio >/dev/null || need_pkgs+=(fio)
command -v nvme >/dev/null || need_pkgs+=(nvme-cli)
command -v ip >/dev/null || need_pkgs+=(iproute2)

apt_updated=0
apt_update() {
  [ "$apt_updated" = 1 ] && return
  log "apt-get update"
  apt-get update -qq >/dev/null
  apt_updated=1
}

if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    die "missing packages ${need_pkgs[*]}; run as root or install them: apt-get install ${need_pkgs[*]}"
  fi
  apt_update
  log "installing ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

# --- the private apt configuration for trixie-backports ---------------------

# host_mirror prints the Debian mirror of the host's apt sources (the first
# .../debian URI that is not the security archive), else deb.debian.org.
host_mirror() {
  local m
  m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
    grep -v '^[[:space:]]*#' | grep -oE '(https?|file)://[^][[:space:]]+/debian/?' | grep -v security | head -n1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

PAPT="$CACHE/apt"
papt_opts=(-o "Dir::Etc::SourceList=$PAPT/sources.list" -o Dir::Etc::SourceParts=/dev/null
  -o "Dir::State::Lists=$PAPT/lists" -o "Dir::Cache=$PAPT/cache")
papt_updated=0
papt_update() {
  [ "$papt_updated" = 1 ] && return
  mkdir -p "$PAPT/lists/partial" "$PAPT/cache/archives/partial"
  # Only trixie-backports: with trixie itself listed, trixie's own (older)
  # linux-image-amd64 would be the candidate (backports are pinned to 100).
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $(host_mirror) trixie-backports main" >"$PAPT/sources.list"
  log "apt-get update (private configuration: $(cat "$PAPT/sources.list"))"
  apt-get "${papt_opts[@]}" update -qq 2>&1 | grep -v unsandboxed >&2 || true
  papt_updated=1
}

# --- resolving and downloading ---------------------------------------------

# resolve ROLE sets pkg to the versioned linux-image package of ROLE (not
# printed: a command substitution's subshell would forget the apt updates).
resolve() {
  case "$1" in
    lts)
      apt_update
      pkg=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6\.12\./{print $2; exit}')
      [ -n "$pkg" ] || die "cannot resolve linux-image-6.12-amd64 (is bookworm-security in the apt sources?)"
      ;;
    newest)
      papt_update
      pkg=$(apt-cache "${papt_opts[@]}" depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
      [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 of trixie-backports"
      ;;
  esac
}

# download ROLE PKG: PKG's .deb into $CACHE/debs, unless it is there.
download() {
  local role=$1 pkg=$2
  ls "$CACHE/debs/${pkg}"_*.deb >/dev/null 2>&1 && return
  log "downloading $pkg"
  # (apt warns that its sandbox user cannot write the cache: harmless)
  if [ "$role" = newest ]; then
    papt_update
    (cd "$CACHE/debs" && apt-get "${papt_opts[@]}" download -qq "$pkg" 2>&1 | grep -v unsandboxed >&2 || true)
  else
    apt_update
    (cd "$CACHE/debs" && apt-get download -qq "$pkg" 2>&1 | grep -v unsandboxed >&2 || true)
  fi
  ls "$CACHE/debs/${pkg}"_*.deb >/dev/null 2>&1 || die "apt-get download $pkg failed"
}

# parts KVER DEB prints the packages DEB depends on that carry the kernel
# itself: from 7.x linux-image-KVER is split into linux-binary-KVER (vmlinuz),
# linux-modules-KVER (the modules) and linux-base-KVER (config,
# modules.builtin); up to 6.x it has everything and this prints nothing.
parts() {
  dpkg-deb -f "$2" Depends | tr ',|' '\n\n' | awk '{print $1}' | grep -E "^linux-[a-z]+-$(printf '%s' "$1" | sed 's/[.+]/\\&/g')\$" || true
}

# --- unpacking ---------------------------------------------------------------

# unpack ROLE PKG: the kernel of PKG into $CACHE/ROLE.
unpack() {
  local role=$1 pkg=$2 kver deb tmp root mdir vmlinuz config n p
  kver=${pkg#linux-image-}
  download "$role" "$pkg"
  deb=$(ls "$CACHE/debs/${pkg}"_*.deb | head -n1)
  tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
  root="$tmp/root"
  log "unpacking $(basename "$deb")"
  dpkg-deb -x "$deb" "$root"
  for p in $(parts "$kver" "$deb"); do
    download "$role" "$p"
    log "unpacking $(basename "$(ls "$CACHE/debs/${p}"_*.deb | head -n1)")"
    dpkg-deb -x "$(ls "$CACHE/debs/${p}"_*.deb | head -n1)" "$root"
  done
  # 7.x installs under /usr/lib/modules; depmod and modprobe -d look in
  # ROOT/lib/modules.
  if [ ! -d "$root/lib/modules/$kver" ] && [ -d "$root/usr/lib/modules/$kver" ]; then
    mkdir -p "$root/lib"
    ln -s ../usr/lib/modules "$root/lib/modules"
  fi
  mdir="$root/lib/modules/$kver"
  [ -d "$mdir" ] || die "$pkg: no lib/modules/$kver in the packages"
  depmod -b "$root" "$kver" # the packages ship no modules.dep
  vmlinuz="$root/boot/vmlinuz-$kver"
  [ -f "$vmlinuz" ] || vmlinuz="$mdir/vmlinuz"
  [ -f "$vmlinuz" ] || die "$pkg: no vmlinuz in the packages"
  config="$root/boot/config-$kver"
  [ -f "$config" ] || config="$mdir/config"

  mkdir -p "$tmp/out/modules"
  cp "$vmlinuz" "$tmp/out/vmlinuz"
  [ -f "$config" ] && cp "$config" "$tmp/out/config"
  echo "$pkg" >"$tmp/out/package"
  echo "$kver" >"$tmp/out/release"
  # Every module with its dependencies, in load order, each once.
  declare -A seen=()
  n=0
  for m in "${MODULES[@]}"; do
    local deps
    deps=$(modprobe -d "$root" -S "$kver" --show-depends "$m") || die "$pkg: modprobe --show-depends $m failed"
    while read -r kind path _; do
      [ "$kind" = insmod ] || continue
      name=$(basename "$path")
      name=${name%%.ko*}
      [ -n "${seen[$name]:-}" ] && continue
      seen[$name]=1
      dst=$(printf '%s/out/modules/%02d-%s.ko' "$tmp" "$n" "$name")
      case "$path" in
        *.xz) xz -dc "$path" >"$dst" ;;
        *.zst) zstd -dcq "$path" >"$dst" ;;
        *.gz) gzip -dc "$path" >"$dst" ;;
        *) cp "$path" "$dst" ;;
      esac
      n=$((n + 1))
    done <<<"$deps"
  done
  # brd: two 64 MiB RAM disks (/dev/ram0, /dev/ram1) for targets.
  printf 'brd rd_nr=2 rd_size=65536\n' >"$tmp/out/modules/params"

  rm -rf "${CACHE:?}/$role.new" "${CACHE:?}/$role.old"
  mv "$tmp/out" "$CACHE/$role.new"
  [ -d "$CACHE/$role" ] && mv "$CACHE/$role" "$CACHE/$role.old"
  mv "$CACHE/$role.new" "$CACHE/$role"
  rm -rf "${CACHE:?}/$role.old" "$tmp"
  log "$role: kernel $kver ready in $CACHE/$role ($n modules)"
}

mkdir -p "$CACHE/debs"
declare -A done_role=()
for role in "${want[@]}"; do
  [ -n "${done_role[$role]:-}" ] && continue
  done_role[$role]=1
  # Reuse a cached kernel when one is there: a warm run needs no network.
  pkg=
  if [ "$update" = 0 ] && [ -f "$CACHE/$role/package" ] && [ -f "$CACHE/$role/vmlinuz" ]; then
    pkg=$(cat "$CACHE/$role/package")
  elif [ "$update" = 0 ] && [ "$role" = lts ] && [ -f "$CACHE/current/package" ]; then
    pkg=$(cat "$CACHE/current/package") # the old layout's kernel: no network
  else
    resolve "$role"
  fi
  if [ -f "$CACHE/$role/package" ] && [ "$(cat "$CACHE/$role/package")" = "$pkg" ] && [ -f "$CACHE/$role/vmlinuz" ]; then
    log "$role: kernel ${pkg#linux-image-} cached in $CACHE/$role"
    continue
  fi
  unpack "$role" "$pkg"
done
