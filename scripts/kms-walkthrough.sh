#!/usr/bin/env bash
# The key-service walkthrough, played with the envfs CLI on an embedded key store in a fresh
# temporary folder (removed on exit). Each command is shown before it runs.
#
#   scripts/kms-walkthrough.sh   (as root, or any user: see below)
#
# The envfs executable: $ENVFS if set, else the repository's .venv/bin/envfs, else envfs on
# PATH.
set -euo pipefail

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

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# An embedded store of its own: never a system store, never a running daemon.
export ENVFS_KMS_DIR=$work/kms
export ENVFS_KMS_SOCKET=$work/no-daemon.sock
export ENVFS_REGION=local-1
unset ENVFS_KMS_PASSPHRASE_FILE

run() {
    printf '\n$ %s\n' "$1"
    eval "$1"
}

echo "envfs key service walkthrough, in $work"

# Root may create keys; anyone else needs to be in the key creators group. For a non-root
# demo, make that the user's own primary group.
creators=""
if [[ $(id -u) != 0 ]]; then
    creators=" --key-creators-group $(id -gn)"
fi
run "envfs kms init$creators"

run 'KEY_ID=$(envfs kms create-key --description "my first envfs key" --tags TagKey=Purpose,TagValue=demo --query KeyMetadata.KeyId --output text)'
run 'echo "$KEY_ID"'
run 'envfs kms create-alias --alias-name alias/demo --target-key-id "$KEY_ID"'
run 'envfs kms describe-key --key-id alias/demo'
run 'envfs kms enable-key-rotation --key-id "$KEY_ID"'

run 'echo "Some text" > myfile.txt'
run 'envfs kms encrypt --key-id alias/demo --plaintext fileb://myfile.txt --output text --query CiphertextBlob | base64 -d > myfile.txt.enc'
run 'ls -l myfile.txt myfile.txt.enc'
run 'envfs kms decrypt --ciphertext-blob fileb://myfile.txt.enc --output text --query Plaintext | base64 -d > myfile.txt.dec'
run 'diff myfile.txt myfile.txt.dec && echo "decrypted: $(cat myfile.txt.dec)"'

run 'envfs kms re-encrypt --ciphertext-blob fileb://myfile.txt.enc --destination-key-id alias/demo --output text --query CiphertextBlob | base64 -d > myfile.txt.reenc'
run 'envfs kms decrypt --ciphertext-blob fileb://myfile.txt.reenc --output text --query Plaintext | base64 -d | diff myfile.txt - && echo "re-encrypted copy decrypts too"'

run 'envfs kms generate-data-key --key-id alias/demo --key-spec AES_256'
run 'envfs kms get-key-rotation-status --key-id "$KEY_ID"'
run 'envfs kms list-aliases'
run "envfs kms audit --output text --query 'Records[*].[time, operation, outcome]'"
run 'envfs kms audit --verify'

printf '\ndemo finished; removing %s\n' "$work"
