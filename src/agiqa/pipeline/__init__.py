"""End-to-end orchestration on top of the stages: the demo."""
