"""What a person clicks: the notebook's helpers, the training panel, the caption editor."""
