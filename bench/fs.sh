#!/usr/bin/env bash
# envfs (encrypted names, and --plaintext-names) beside gocryptfs on the same disk:
# sequential write/read, untar, ls -lR, cat, random 4 KiB reads; medians of alternated
# repetitions and the envfs/gocryptfs time ratios.
# The work is done by bench/fs_bench.py (see its docstring); this wrapper checks what is
# needed, makes the temporary folder on a real disk and removes it (unmounting whatever is
# still mounted under it) on any exit.
#
# Usage (as root): bench/fs.sh [--reps N] [--size-mb MB] [--files N] [--rand-reads N]
#                  [--requests] [--json]
# Env: ENVFS_BENCH_DIR     parent of the temporary folder (default /var/tmp; not tmpfs)
#      ENVFS_BENCH_PYTHON  the Python with envfs installed (default: the repo's .venv)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${ENVFS_BENCH_PYTHON:-$here/../.venv/bin/python}"

missing=()
[ -x "$python" ] || missing+=("$python (run: make setup)")
command -v gocryptfs >/dev/null || missing+=("gocryptfs (apt-get install gocryptfs)")
command -v fusermount3 >/dev/null || missing+=("fusermount3 (apt-get install fuse3)")
if [ "${#missing[@]}" -gt 0 ]; then
  printf 'fs.sh: missing: %s\n' "${missing[@]}" >&2
  exit 2
fi
if [ "$(id -u)" != 0 ]; then
  echo "fs.sh: run as root (drop_caches, mounts)" >&2
  exit 2
fi

parent="${ENVFS_BENCH_DIR:-/var/tmp}"
if [ "$(stat -f -c %T "$parent")" = tmpfs ]; then
  echo "fs.sh: $parent is tmpfs; set ENVFS_BENCH_DIR to a folder on a real disk" >&2
  exit 2
fi
work="$(mktemp -d "$parent/envfs-fs-bench.XXXXXX")"

cleanup() {
  local mnt
  # Deepest first; lazily, so a stuck daemon cannot keep the folder from being removed.
  while read -r mnt; do
    fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null || true
  done < <(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/self/mounts | sort -r)
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

# In the background so that a signal reaches us at once; passed on, so the Python side
# unmounts in order before the trap's lazy clean-up.
child=""
stop() {
  trap - INT TERM HUP
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null && wait "$child" 2>/dev/null
  exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM
trap 'stop 129' HUP
"$python" "$here/fs_bench.py" --workdir "$work" "$@" &
child=$!
wait "$child"
