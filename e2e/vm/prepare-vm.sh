#!/usr/bin/env bash
# prepare-vm.sh: install what the e2e VM needs on a Debian host and cache
# Debian's 6.12 kernel (never installed on the host: downloaded with
# `apt-get download` and unpacked into the cache).
#
# Result, in $UBLK_NVMEOF_VM_CACHE (default ~/.cache/ublk-nvmeof/vm):
#   current/vmlinuz             the kernel
#   current/modules/NN-name.ko  decompressed modules, NN = load order
#   current/modules/params      "name args" lines for modules that take some
#   current/release             the kernel release string
# Idempotent: a warm cache costs well under a second.
set -euo pipefail

CACHE=${UBLK_NVMEOF_VM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ublk-nvmeof/vm}
# Modules the guest loads, dependencies first (each one's own dependencies are
# resolved from the kernel's modules.dep below).
MODULES=(configfs nvme-tcp nvmet-tcp brd ublk_drv null_blk loop veth ext4)

log() { printf '[prepare-vm] %s\n' "$*" >&2; }

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
    log "missing packages ${need_pkgs[*]}; run as root or install them: apt-get install ${need_pkgs[*]}"
    exit 1
  fi
  apt_update
  log "installing ${need_pkgs[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

mkdir -p "$CACHE/debs"
KPKG=${KPKG:-}
if [ -z "$KPKG" ]; then
  # Reuse a cached kernel when one is there: a warm run needs no network.
  if [ -f "$CACHE/current/package" ]; then
    KPKG=$(cat "$CACHE/current/package")
  else
    apt_update
    KPKG=$(apt-cache depends linux-image-6.12-amd64 2>/dev/null | awk '/Depends: linux-image-6\.12\./{print $2; exit}')
    [ -n "$KPKG" ] || { log "cannot resolve linux-image-6.12-amd64 (is bookworm-security in the apt sources?)"; exit 1; }
  fi
fi
KVER=${KPKG#linux-image-}

if [ -f "$CACHE/current/package" ] && [ "$(cat "$CACHE/current/package")" = "$KPKG" ] && [ -f "$CACHE/current/vmlinuz" ]; then
  log "kernel $KVER cached in $CACHE/current"
  exit 0
fi

if ! ls "$CACHE/debs/${KPKG}"_*.deb >/dev/null 2>&1; then
  apt_update
  log "downloading $KPKG (about 100 MB, once)"
  # (apt warns that its sandbox user cannot write the cache: harmless)
  (cd "$CACHE/debs" && apt-get download -qq "$KPKG" 2>&1 | grep -v "unsandboxed" >&2 || true)
  ls "$CACHE/debs/${KPKG}"_*.deb >/dev/null 2>&1 || { log "apt-get download $KPKG failed"; exit 1; }
fi
deb=$(ls "$CACHE/debs/${KPKG}"_*.deb | head -n1)

tmp=$(mktemp -d "$CACHE/.unpack.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "unpacking $(basename "$deb")"
dpkg-deb -x "$deb" "$tmp/root"
depmod -b "$tmp/root" "$KVER"   # the package ships no modules.dep

mkdir -p "$tmp/out/modules"
cp "$tmp/root/boot/vmlinuz-$KVER" "$tmp/out/vmlinuz"
echo "$KPKG" > "$tmp/out/package"
echo "$KVER" > "$tmp/out/release"
# Every module with its dependencies, in load order, each once.
declare -A seen=()
n=0
for m in "${MODULES[@]}"; do
  while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    name=$(basename "$path"); name=${name%%.ko*}
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
  done < <(modprobe -d "$tmp/root" -S "$KVER" --show-depends "$m")
done
# brd: two 64 MiB RAM disks (/dev/ram0, /dev/ram1) for targets.
printf 'brd rd_nr=2 rd_size=65536\n' >"$tmp/out/modules/params"
cp "$tmp/root/boot/config-$KVER" "$tmp/out/config"

rm -rf "$CACHE/current.new" "$CACHE/current.old"
mv "$tmp/out" "$CACHE/current.new"
[ -d "$CACHE/current" ] && mv "$CACHE/current" "$CACHE/current.old"
mv "$CACHE/current.new" "$CACHE/current"
rm -rf "$CACHE/current.old"
log "kernel $KVER ready in $CACHE/current ($n modules)"
