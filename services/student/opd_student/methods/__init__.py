"""The OPD method zoo as small options of `opd train` (docs/methods.md).

Each module holds the pure selection/weighting logic of one method, tested on hand-made cases:

- horizon.py       TOPD / POPD: how many tokens a rollout may have at step k (generation stops there)
- teachability.py  TA-OPD: per-token teachability and the top-fraction selection
- filtering.py     FiRe-OPD style: drop the rollouts the teacher likes least, reweight tokens by confidence
- token_mask.py    token-restricted distillation: token-id set, regex on the decoded text, data spans
- routing.py       several teachers: route a prompt to a teacher by name or by rule
- teacher_metrics.py  per-teacher KL / logprob / token counts for metrics.jsonl
- step_weights.py  one weight per completion token of a step, normalised over the step
- options.py       what train.py calls (parsed settings of a run); checks.py validates them for TrainConfig
"""
