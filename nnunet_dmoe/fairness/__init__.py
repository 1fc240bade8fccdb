"""Fairness training: the comparators' losses (Group DRO, FEBS, the adversary's) and the adversary network."""
