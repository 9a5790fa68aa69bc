"""One training loop for every offline method; objectives plug into it."""
