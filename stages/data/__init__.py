"""moonforge.stages.data."""
