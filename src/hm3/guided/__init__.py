"""Label-free steps, each a function of (model in memory, sources, calibration batches): LEWIS
densities, RegMean, learned coefficients, head alignment, bias re-centring. `hm3.pipeline`
composes them for a recipe."""
