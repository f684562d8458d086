"""moonforge.registry."""
