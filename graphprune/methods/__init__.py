"""Classic mask-based methods that keep shapes (``unstructured``), sparsity-inducing training
penalties (``sparsity``) and accuracy recovery by distillation (``recover``)."""
