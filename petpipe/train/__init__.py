"""Training: the fit loop and the Learner around it, the optimiser and its schedules, the learning rate range
test, resume files, seeds, and the machine (levers, hardware, torch.distributed, memory)."""
