"""DPO training of θ_t: the loop, θ0's reference log-probs, the optimizer, launcher glue, memory-saving autograd."""
