"""The engine: commits, validation, backups, quarantine and recovery of one backing tree.

It knows nothing of FUSE, so the filesystem layer, the CLI and tests use it alike. Its calls
block (they fsync): the filesystem layer runs them in worker threads.
"""
