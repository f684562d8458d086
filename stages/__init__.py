"""moonforge.stages."""
