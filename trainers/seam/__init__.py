"""Support of the trainers' seam: seeding, the attribute channel's protection and checks, schedules, the registry, CPU
memory, upcycling, group-balanced sampling and the fairness-loss base."""
