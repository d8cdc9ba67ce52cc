"""Flow-matching solvers (UniPC, DPM++) used by WanT2V.generate."""
