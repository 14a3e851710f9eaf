"""Command groups of the edgeloop CLI."""
