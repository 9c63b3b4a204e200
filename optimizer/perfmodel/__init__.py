"""The performance model: GPU specifications, model shapes, the roofline of one engine step and the memory
arithmetic of a configuration. Engine-neutral numbers that the sim, the pre-launch rules, the estimate
fidelity and the reports all read, so a weight-bytes or step-time figure means the same thing everywhere."""
