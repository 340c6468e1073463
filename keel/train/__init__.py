"""Training: the resilient loop SFT and RL share (loop.py) and the SFT stage (sft.py)."""
