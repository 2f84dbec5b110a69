"""The Python API (``api``) and the orchestration over the stages that it and the command
line share (the offline ``demo``)."""
