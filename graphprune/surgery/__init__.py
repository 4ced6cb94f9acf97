"""Stage 3, making the model smaller: slice the planned tensors (``slicing``), infer and update the
size attributes and graph constants a forward reads (``sizes``), fall back to keeping what cannot be
updated safely (``fallback``), update Hugging Face configs (``hf``), and save / load pruned models
(``io``)."""
