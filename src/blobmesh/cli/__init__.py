"""The ``blobmesh`` command line interface."""
