"""Run directories, presets (data sets, prompts, MLLMs) and end-to-end orchestration."""
