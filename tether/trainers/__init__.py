"""Training loops, one per file: ppo (PPO with KL), reward (reward-model training)."""
