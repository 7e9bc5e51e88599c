"""The torch.optim face: the Optimizer adapter, the drop-in classes, state dicts and torch.optim
interop, gradient release, clipping, AMP and 16-bit models."""
