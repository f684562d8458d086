"""moonforge.model."""
