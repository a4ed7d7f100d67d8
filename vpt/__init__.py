"""vpt: visual prompt tuning for frozen vision foundation models."""
