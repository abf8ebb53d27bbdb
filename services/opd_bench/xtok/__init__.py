"""`opd bench xtok`: cross-tokenizer distillation, opd against TRL's GOLDTrainer on the same pair
(the default student, the embedded Gemma 3 270M teacher), the same budget, one per-byte measure."""
