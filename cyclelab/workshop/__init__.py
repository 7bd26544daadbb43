"""Layer 8, workshop: the course runner, the student edition, grading, the bug hunt, lessons, and hub
planning (sizing and agendas)."""
