"""Block steps: work run on each block after it is pruned, inside the one calibration loop."""
