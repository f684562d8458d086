"""moonforge.stages.train."""
