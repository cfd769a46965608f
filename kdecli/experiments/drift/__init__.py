"""drift: what an approximation in chosen layers does to a model's hidden states and output."""
