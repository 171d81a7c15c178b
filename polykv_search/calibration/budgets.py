"""The default budget grid of calibration."""

# Tokens kept per layer; powers of two with midpoints so the optimizer has fine steps where they matter.
DEFAULT_BUDGETS: tuple[int, ...] = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
