"""opd_student: the student trainer (reaches the teacher only over the network, through opd_client)."""
