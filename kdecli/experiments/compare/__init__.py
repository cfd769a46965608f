"""compare: methods × budgets × seeds against the exact reference on one or more inputs."""
