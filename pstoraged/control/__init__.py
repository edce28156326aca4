"""The control plane: the daemon that wires the layers together, the REST API,
the `pstorage` CLI and its client, configuration, systemd integration and
logging. The top layer: it imports everything below, nothing imports it.
"""
