"""Stage 1, reading the model: trace it with torch.export, label every tensor dimension with the
channels it carries (one rule per ATen op, in ``rules/``), and group the channels that must be
removed together (``analysis``)."""
