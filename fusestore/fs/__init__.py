"""The filesystem layer: maps FUSE requests onto the backing tree and the engine.

`operations` holds the request handlers, `nodes` the inode table, `virtual` the `.backups` view.
"""
