#!/usr/bin/env bash
# The main job: mount a demo encrypted folder on an embedded key store.
#
#   scripts/demo.sh          (make demo runs it)
#
# Everything lives in $DEMO_DIR (default: ./demo in the repository): the region's key store
# (demo/kms), the ciphertext folder (demo/backing) and the mount point (demo/mnt). Running
# it again unmounts and starts over. The mount stays up when the script ends, so you can
# use it; the last lines say how to unmount.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

demo=${DEMO_DIR:-$repo/demo}
mkdir -p "$demo"
demo=$(cd "$demo" && pwd)
if grep -qs " $demo/mnt fuse.envfs " /proc/mounts; then
    envfs umount "$demo/mnt"
fi
rm -rf "$demo/kms" "$demo/backing" "$demo/mnt" "$demo/mount.log"
mkdir -p "$demo/mnt"
cd "$demo"

# The demo's own embedded store: never a system store, never a running daemon.
export ENVFS_KMS_DIR=$demo/kms
export ENVFS_KMS_SOCKET=$demo/no-daemon.sock
export ENVFS_REGION=local-1
unset ENVFS_KMS_PASSPHRASE_FILE

echo "envfs demo, in $demo"
run "envfs kms init$creators"
run 'KEY_ID=$(envfs kms create-key --description "demo volume key" --tags TagKey=Purpose,TagValue=demo --query KeyMetadata.KeyId --output text)'
run 'envfs kms create-alias --alias-name alias/demo --target-key-id "$KEY_ID"'
run 'envfs kms enable-key-rotation --key-id alias/demo'
run 'envfs init backing --key-id alias/demo'
run 'envfs mount backing mnt --log-file mount.log'
run 'echo "Some text, written through the mount" > mnt/myfile.txt'
run 'cat mnt/myfile.txt'
run 'ls -l mnt'
# Behind the mount: the volume file, the root folder's id (.envfs-dir) and the file under
# its encrypted name.
run 'ls -la backing'
run 'FILE=$(find backing -maxdepth 1 -type f ! -name ".*")'
run 'od -A d -c "$FILE" | head -n 4'
run '! ls -aR backing | grep -q myfile && echo "the backing folder holds no plaintext name"'
run '! grep -q "Some text" "$FILE" && echo "the backing file holds no plaintext"'
run 'envfs inspect "$FILE"'
run 'envfs kms audit --key-id alias/demo --output text --query "Records[*].[operation, outcome]" | tail -n 3'

cat <<MSG

The encrypted folder is mounted on $demo/mnt (ciphertext in $demo/backing).
To unmount it:
    $envfs_bin umount $demo/mnt
MSG
