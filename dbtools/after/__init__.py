"""After training: scores and the best step, preview grids, export to single files and
UI LoRA files, generate, cleanup."""
