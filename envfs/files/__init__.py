"""The file side: the encrypted folder, from the backing folder's bytes to the FUSE mount."""
