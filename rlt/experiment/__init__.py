"""The micro-scale RLT experiment ("does it teach?"): scripts/experiment.sh runs ``python -m rlt.experiment``.

runner    the pipeline's stages in one process: tiny models, SFT, teacher GRPO, distillation, evaluation
pipeline  the experiment itself (presets, stages, summary) and the learning-curve study
report    report.md, summary.json and the plots (statistics: rlt/stats.py)
"""
