"""Models: the MLLM adapter, the MANIQA backbone, the MoE head and the full MA-AGIQA network."""
