"""Constants of the base-2 online softmax every kernel runs.

Scores are scaled by `softmax_scale * LOG2_E` so the kernels use exp2; the
log-sum-exp leaves the kernels in natural log (times `LN_2`).
"""

LOG2_E = 1.4426950408889634
LN_2 = 0.6931471805599453
