"""`opd bench compare`: opd against TRL's distillation trainers and SFT on teacher samples, same budget.

settings.py   the shared settings and the five arms
budget.py     pure helpers: prompt schedule, eval points, fitting SFT data to the teacher-token budget
records.py    the files each arm leaves: steps.jsonl, evals.jsonl, arm.json
child.py      one training run = one subprocess (peak RSS from wait4), with progress lines
opd_arm.py    the opd arms: `opd train` as a subprocess, its metrics.jsonl read back
trl_arms.py   worker: TRL DistillationTrainer (in-process teacher) / ServerDistillationTrainer (the service)
sft_arm.py    worker: the teacher samples the budget, then TRL SFTTrainer trains on it
callbacks.py  the TrainerCallback the TRL workers share: step times, teacher tokens, snapshots
snapshot_eval.py  worker: opd's evaluate() on the snapshots the TRL workers saved
results.py    results.json, table.md and the two plots
runner.py     the command: teacher service, arms in order, evaluation, outputs
"""
