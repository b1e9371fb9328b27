"""Reliability tests: bad input fails early and clearly, faults stop loudly, runs resume exactly."""
