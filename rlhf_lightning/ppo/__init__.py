"""rlhf_lightning/ppo"""
