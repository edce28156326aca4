"""The engine: the pool on its device and everything that keeps its data.

Format and backing device at the bottom; the metadata store, the segment log
(FTL), the dedupe index, the reducer and codecs above them; the engine itself
(volumes, maps, chunks, refcounts, flush), snapshots, the cleaner and scrub on
top. Nothing here imports from the front ends, analytics or control.
"""
