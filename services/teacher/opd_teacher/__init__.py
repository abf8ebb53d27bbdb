"""opd_teacher: the teacher service (white-box HF backend, HTTP and gRPC faces)."""
