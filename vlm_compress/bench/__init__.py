"""The embedded benchmark: the ShapesVQA task, training of the tiny models, and the benchmark runner."""
