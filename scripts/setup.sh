#!/usr/bin/env bash
# Installs what kiln needs (with --tests, also what its tests need), idempotently, then
# builds kiln. Run by scripts/quickstart.sh and (with --tests) scripts/test.sh; safe to run
# again.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$here")

log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

tests=no
[ "${1:-}" = "--tests" ] && tests=yes

want=()
while read -r line; do
  line=${line%%#*}
  line=${line//[[:space:]]/}
  if [ "$line" = "[tests]" ]; then
    [ "$tests" = yes ] && continue || break
  fi
  [ -n "$line" ] && want+=("$line")
done < "$here/packages.txt"

missing=()
for p in "${want[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done
# qemu-system-x86 and qemu-utils must be the same release: a machine may ship a newer
# qemu-utils alone, which Breaks the qemu-system-common of the distro's qemu-system-x86.
qemu_pair_ok() {
  local a b
  a=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null || true)
  b=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  [ -n "$a" ] && [ "$a" = "$b" ]
}

if [ ${#missing[@]} -gt 0 ] || ! qemu_pair_ok; then
  if [ "$(id -u)" != 0 ]; then
    SUDO=sudo
  else
    SUDO=
  fi
  log "installing Debian packages: ${missing[*]:-qemu (matching versions)}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  qver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/{print $2}')
  pkgs=()
  for p in "${want[@]}"; do
    case "$p" in
      qemu-system-x86|qemu-utils) pkgs+=("$p=$qver") ;;
      *) pkgs+=("$p") ;;
    esac
  done
  $SUDO apt-get install -y -q --no-install-recommends --allow-downgrades "${pkgs[@]}" >/tmp/kiln-apt.log 2>&1 \
    || { tail -20 /tmp/kiln-apt.log >&2; log "apt-get install failed (log: /tmp/kiln-apt.log)"; exit 1; }
  # openssh-server is only for the SSH communicator's tests, which run their own sshd on
  # loopback: a host that had no ssh service gets none enabled or running by this install.
  case " ${missing[*]} " in
    *" openssh-server "*) $SUDO systemctl disable --now ssh >/dev/null 2>&1 || true ;;
  esac
fi

if ! command -v cargo >/dev/null; then
  log "cargo is not on PATH: kiln needs a Rust toolchain (rustup) to build"
  exit 1
fi

cd "$root"
# kiln's build also builds the static guest agent (target/agent/kiln-agent) and embeds it.
log "building kiln (release)"
cargo build --release --workspace --bins
