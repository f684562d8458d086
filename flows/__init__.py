"""moonforge.flows."""
