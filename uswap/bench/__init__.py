"""`uswap bench`: uswap against kernel swap, side by side (see runner.py)."""
