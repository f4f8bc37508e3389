"""The auto-captioning stage: BLIP / BLIP-2, Florence-2, WD14-style taggers and instruction VLMs."""
