#!/usr/bin/env bash
# The key-service walkthrough, played with the envfs CLI on an embedded key store in a fresh
# temporary folder (removed on exit). Each command is shown before it runs.
#
#   scripts/kms-walkthrough.sh   (as root, or any user: see below)
#
# The envfs executable: $ENVFS if set, else the repository's .venv/bin/envfs, else envfs on
# PATH.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

# An embedded store of its own: never a system store, never a running daemon.
export ENVFS_KMS_DIR=$work/kms
export ENVFS_KMS_SOCKET=$work/no-daemon.sock
export ENVFS_REGION=local-1
unset ENVFS_KMS_PASSPHRASE_FILE

echo "envfs key service walkthrough, in $work"

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
