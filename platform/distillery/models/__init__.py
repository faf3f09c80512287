"""The networks and their saved specs: teacher, student, the sequence model."""
