"""edgeloop flows."""
