"""edgeloop edge_agent."""
