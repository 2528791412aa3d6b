"""Data: HQ image sources, the grain pipeline, and the Real-ESRGAN degradation chain."""
