"""The ``edgeloop`` command line: the top layer, above flows/, orchestrator/ and edge_agent/ it calls."""
