"""The paper's equations and the statistics around them, as pure functions."""
