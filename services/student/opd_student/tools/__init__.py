"""Tools around a training run, apart from the loop itself:

- make_student.py    `opd make-student`: a layer-pruned student from a teacher (and the default student)
- layer_pruning.py   which decoder layers to remove, by measured harm
- analyze_update.py  `opd analyze-update`: which parameters a run moved (update_analysis.py measures,
                     update_report.py renders)
- report.py          `opd report`: plots and summary of a run directory
- codistill.py       `opd codistill`: two students, two teacher services, each the other's teacher (OPCoD)
"""
