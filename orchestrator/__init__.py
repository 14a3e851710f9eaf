"""edgeloop orchestrator."""
