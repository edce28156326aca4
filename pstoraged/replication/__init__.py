"""Replication between pstoraged daemons: the wire format (wire.py), peers and
their pinned identities (peers.py), the authenticated, encrypted channel and
its request/response layer (channel.py), the TCP listener and the service the
daemon runs (service.py). The replication features register their message
handlers on the service."""
