"""Pure loss maths: tensors in, tensor out; the registered terms in methods/ wrap these."""
