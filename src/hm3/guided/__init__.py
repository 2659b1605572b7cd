"""Label-free merging: heads kept whole, bias re-centring, LEWIS, RegMean, learned coefficients."""
