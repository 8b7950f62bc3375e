"""The TCAN animation model: reference attention, APPA LoRA, temporal ControlNet, PTM, windows."""
