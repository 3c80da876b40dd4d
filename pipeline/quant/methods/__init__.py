"""PTQ methods that choose weights and transforms from calibration data: GPTQ, QuaRot, FlatQuant."""
