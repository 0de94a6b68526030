"""The training recipe without a framework: the stage schedule, what each step computes, and the own loss terms."""
