"""The teacher reward: r_SS - lambda * r_KL, scored by a frozen student."""
