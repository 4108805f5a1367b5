# Shared by scripts/make-bundle.sh and scripts/make-machine.sh (sourced): the Debian mirror
# debootstrap uses, and the clean-up of a half-built tree in "$tmp" on exit.

# The first http(s) Debian mirror of the machine's apt sources (one-line and deb822 formats),
# skipping the security archive, which has no plain suite.
apt_mirror() {
  local uri
  uri=$( {
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
      | sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p'
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
      | sed -nE 's/^URIs:[[:space:]]*//p' | tr ' ' '\n'
  } | grep -E '^https?://' | grep -v -- '-security' | head -n1 || true)
  echo "${uri:-http://deb.debian.org/debian}"
}

tmp=
cleanup() {
  [ -n "$tmp" ] && [ -d "$tmp" ] || return 0
  # A failed debootstrap can leave /proc and /sys mounted in the half-built tree.
  awk -v t="$tmp/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r \
    | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT
