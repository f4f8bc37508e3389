"""The training stage: config and flags, set-up, data, the loop, outputs,
checkpoints, class images for prior preservation."""
