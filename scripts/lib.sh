# Shared by the demo scripts (sourced, not run): find the envfs executable, and show each
# command before running it.
#
# The envfs executable: $ENVFS if set, else the repository's .venv/bin/envfs, else envfs on
# PATH.

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -n ${ENVFS:-} ]]; then
    envfs_bin=$ENVFS
elif [[ -x $repo/.venv/bin/envfs ]]; then
    envfs_bin=$repo/.venv/bin/envfs
elif envfs_bin=$(command -v envfs); then
    :
else
    echo "demo: error: no envfs executable (run 'make setup' first, or set ENVFS)" >&2
    exit 1
fi
# Commands read as they would be typed: "envfs kms ...".
envfs() { "$envfs_bin" "$@"; }

run() {
    printf '\n$ %s\n' "$1"
    eval "$1"
}

# Root may create keys; anyone else needs to be in the key creators group. For a non-root
# demo, make that the user's own primary group.
creators=""
if [[ $(id -u) != 0 ]]; then
    creators=" --key-creators-group $(id -gn)"
fi
