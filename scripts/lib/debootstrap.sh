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

# A failed debootstrap can leave /proc and /sys mounted in the half-built tree DIR.
unmount_under() {
  awk -v t="$1/" 'index($2, t) == 1 { print $2 }' /proc/mounts | sort -r \
    | xargs -r -n1 umount -l || true
}

tmp=
cleanup() {
  [ -n "$tmp" ] && [ -d "$tmp" ] || return 0
  unmount_under "$tmp"
  rm -rf --one-file-system "$tmp"
}
trap cleanup EXIT

# debootstrap_into NAME DIR SUITE MIRROR OPTION...: debootstraps SUITE from MIRROR into the
# fresh DIR, its log in DIR.log. A failed run (a mirror's hiccup, a maintainer script killed
# under load) is tried once more from an empty DIR; a second failure prints the tails of both
# logs (debootstrap's own log inside DIR holds the failing dpkg's words) and returns 1.
debootstrap_into() {
  local name=$1 dir=$2 suite=$3 mirror=$4 attempt
  shift 4
  for attempt in 1 2; do
    if debootstrap "$@" "$suite" "$dir" "$mirror" >"$dir.log" 2>&1; then
      rm -f "$dir.log"
      return 0
    fi
    echo "$name: debootstrap attempt $attempt failed: $(tail -n 1 "$dir.log")" >&2
    [ "$attempt" = 2 ] && break
    unmount_under "$dir"
    find "$dir" -mindepth 1 -maxdepth 1 -exec rm -rf --one-file-system {} +
  done
  tail -n 20 "$dir.log" >&2
  if [ -f "$dir/debootstrap/debootstrap.log" ]; then
    echo "--- $dir/debootstrap/debootstrap.log (tail)" >&2
    tail -n 30 "$dir/debootstrap/debootstrap.log" >&2
  fi
  return 1
}
