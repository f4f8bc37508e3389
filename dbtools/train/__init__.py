"""The training stage: config and flags, set-up, data, the loop, losses, outputs,
checkpoints, class images for prior preservation."""
