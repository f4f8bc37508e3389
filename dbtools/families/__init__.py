"""Model families: detection, loading, prompt encoding and everything else that differs
between SD 1.x/2.x, SDXL and the families that come next. One module per family."""
