"""rlt: Reinforcement Learning Teachers of test-time scaling, on trl 1.x."""

__version__ = "0.1.0"
