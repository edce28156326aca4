"""Front ends: the ways block I/O reaches the engine.

The data plane (the engine thread and its executor) serves the NBD data
socket and the FUSE file system; exports start nbdkit and attach devices.
Imports point down into the engine only.
"""
