"""The lab workflow on top of stage two: sweeps, reports and exported students."""
