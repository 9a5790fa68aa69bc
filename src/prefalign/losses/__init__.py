"""Pure loss functions over tensors: no model, no I/O. Methods are registered in train/methods.py."""
