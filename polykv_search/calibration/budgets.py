"""The default budget grids of calibration."""

# Tokens kept per layer; powers of two with midpoints so the optimizer has fine steps where they matter.
DEFAULT_BUDGETS: tuple[int, ...] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
# The per-head recipe's grid (calibrate --head-fisher / --head-kl): per KV head the choices are coarse (little,
# some, most of a 1-4k context, everything), and every level costs the probes a forward per head.
HEAD_BUDGETS: tuple[int, ...] = (16, 64, 256, 1024, 2048)
